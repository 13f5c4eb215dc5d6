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
        self.pod_config_file(name, annotations, json!({}))
    }

    /// A pod config carrying the pod's resources as the kubelet computes them (the
    /// sum of its containers' limits), which containerd turns into its sandbox
    /// annotations.
    fn pod_config_with_resources(&self, name: &str, cpu_quota: i64, memory_bytes: i64) -> Result<String> {
        self.pod_config_file(name, &[], limits(cpu_quota, memory_bytes))
    }

    /// A pod config with CRI's `DNSConfig` (servers, searches, options).
    fn pod_config_dns(&self, name: &str, dns: Value) -> Result<String> {
        let path = self.pod_config(name)?;
        let mut pod: Value = serde_json::from_slice(&std::fs::read(&path)?)?;
        pod["dns_config"] = dns;
        self.file(&format!("pod-{name}.json"), &pod)
    }

    /// The pod's IP address, as CNI gave it (`crictl inspectp`).
    fn pod_ip(&self, pod: &str) -> Result<String> {
        let status = self.inspect("inspectp", pod)?;
        let ip = status["status"]["network"]["ip"].as_str().unwrap_or_default().to_string();
        ensure!(!ip.is_empty(), "pod {pod} has no IP: {}", status["status"]["network"]);
        Ok(ip)
    }

    /// The pod's network namespace path (from its runtime spec).
    fn pod_netns(&self, pod: &str) -> Result<PathBuf> {
        let status = self.inspect("inspectp", pod)?;
        let namespaces = status["info"]["runtimeSpec"]["linux"]["namespaces"].as_array().cloned().unwrap_or_default();
        namespaces
            .iter()
            .find(|n| n["type"] == "network")
            .and_then(|n| n["path"].as_str())
            .map(PathBuf::from)
            .with_context(|| format!("pod {pod}: no network namespace path in its runtime spec"))
    }

    /// The pod config file all of the above write: `linux` is its
    /// `LinuxPodSandboxConfig`.
    fn pod_config_file(&self, name: &str, annotations: &[(&str, &str)], linux: Value) -> Result<String> {
        let logs = self.dir.join("logs").join(name);
        std::fs::create_dir_all(&logs)?;
        let annotations: serde_json::Map<String, Value> = annotations.iter().map(|(k, v)| (k.to_string(), Value::from(*v))).collect();
        let pod = json!({
            "metadata": {"name": name, "namespace": "vfvm-test", "uid": format!("{name}-uid"), "attempt": 0},
            "hostname": name,
            "log_directory": logs,
            "annotations": annotations,
            "linux": linux
        });
        self.file(&format!("pod-{name}.json"), &pod)
    }

    /// A busybox container config running `script` with CPU and memory limits.
    fn container_config_limited(&self, name: &str, script: &str, cpu_quota: i64, memory_bytes: i64) -> Result<String> {
        self.container_config_file(name, script, &[], limits(cpu_quota, memory_bytes), json!([]))
    }

    /// A busybox container config running `script` with these env vars.
    fn container_config_env(&self, name: &str, script: &str, env: &[(&str, &str)]) -> Result<String> {
        self.container_config_file(name, script, env, json!({}), json!([]))
    }

    /// A busybox container config running `script`.
    fn container_config(&self, name: &str, script: &str) -> Result<String> {
        self.container_config_file(name, script, &[], json!({}), json!([]))
    }

    /// A busybox container config running `script` with these CRI `Mount`s
    /// (`host_path`, `container_path`, `readonly`), as the kubelet passes volumes.
    fn container_config_mounts(&self, name: &str, script: &str, mounts: &[(&Path, &str, bool)]) -> Result<String> {
        let mounts: Vec<Value> =
            mounts.iter().map(|(host, container, ro)| json!({"host_path": host, "container_path": container, "readonly": ro})).collect();
        self.container_config_file(name, script, &[], json!({}), Value::from(mounts))
    }

    /// The container config file all of the above write: `linux` is its
    /// `LinuxContainerConfig`, `mounts` its CRI mounts.
    fn container_config_file(&self, name: &str, script: &str, env: &[(&str, &str)], linux: Value, mounts: Value) -> Result<String> {
        let envs: Vec<Value> = env.iter().map(|(k, v)| json!({"key": k, "value": v})).collect();
        let container = json!({
            "metadata": {"name": name},
            "image": {"image": oci::BUSYBOX_REF},
            "command": ["sh", "-c", script],
            "envs": envs,
            "log_path": format!("{name}.log"),
            "linux": linux,
            "mounts": mounts
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
        // A pod whose VM died under it (the lab's L3 faults) may still be stopping
        // when stopp returns: rmp refuses a running sandbox, and stopp is idempotent.
        let mut tries = 0;
        while let Err(e) = self.ok(&["rmp", pod]) {
            tries += 1;
            if tries == 3 || !format!("{e:#}").contains("please stop it first") {
                return Err(e);
            }
            eprintln!("cleanup: pod {pod} still running after stopp; stopping it again");
            self.ok(&["stopp", pod])?;
        }
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

/// CPU (CFS quota over a 100 ms period) and memory limits, as CRI's `linux` config
/// of a pod or a container carries them.
fn limits(cpu_quota: i64, memory_bytes: i64) -> Value {
    json!({"resources": {"cpu_period": 100000, "cpu_quota": cpu_quota, "memory_limit_in_bytes": memory_bytes}})
}

/// The VM's size as its VMM reports it: (vCPUs, MiB).
fn vm_size(pod: &str) -> Result<(u32, u64)> {
    use vfvm_protocols::vmm_api::{Request, Response, VmmClient};
    let socket = Path::new(VFVM_STATE_DIR).join(pod).join("api.sock");
    let mut vmm = VmmClient::connect(&socket, Duration::from_secs(30)).with_context(|| format!("{}", socket.display()))?;
    match vmm.call(Request::Status).with_context(|| format!("status from {}", socket.display()))? {
        Response::Status { vcpus, memory_mib, .. } => Ok((vcpus, memory_mib)),
        other => bail!("status from {}: {other:?}", socket.display()),
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
        // Pods that give no resources get the configured base size.
        for pod in [&a, &b] {
            let size = vm_size(pod)?;
            ensure!(size == (1, 512), "pod {pod} without resources: a VM of 1 vCPU and 512 MiB expected, got {size:?}");
        }

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

const MIB: i64 = 1 << 20;

/// `ctr task metrics` figures of a task, from its table (`memory.usage_limit 123`).
/// `cat PATH` in container `id`: the file's content, or why it failed. crictl's
/// `exec -s` prints the command's stdout and then its (here empty) stderr, each
/// followed by a newline (see `pods_in_vms`).
fn cat(cri: &Cri, id: &str, path: &str) -> Result<String> {
    let (code, stdout, stderr) = cri.exec(id, &["cat", path])?;
    ensure!(code == 0, "cat {path} in {id}: exit {code}, {stderr}");
    stdout.strip_suffix("\n\n").map(str::to_string).with_context(|| format!("cat {path} in {id}: crictl printed {stdout:?}"))
}

/// A configMap volume as the kubelet writes it: `key` -> `..data/key`, `..data` ->
/// a timestamped directory, switched atomically by renaming a new `..data` link over it.
fn write_config_map(dir: &Path, version: &str, value: &str) -> Result<()> {
    let data = dir.join(format!("..{version}"));
    std::fs::create_dir_all(&data)?;
    std::fs::write(data.join("key"), value)?;
    let next = dir.join("..data_tmp");
    std::os::unix::fs::symlink(format!("..{version}"), &next)?;
    std::fs::rename(&next, dir.join("..data"))?;
    if std::fs::symlink_metadata(dir.join("key")).is_err() {
        std::os::unix::fs::symlink("..data/key", dir.join("key"))?;
    }
    Ok(())
}

/// Pod volumes through CRI (the volumes issue) and the share's read-only top (the
/// hardening issue's first hole):
/// - a configMap-like directory mounted read-only: read in the container; the
///   `..data` switch on the host seen at the next read (virtiofsd runs with
///   `--cache=never`); a write fails in the container and on the host nothing changed;
/// - a hostPath directory read-write: live both ways;
/// - an emptyDir (a host directory) shared by two containers of the pod;
/// - the termination log: what the container writes is in the host file the
///   kubelet reads; a container that writes it and exits 3: `crictl inspect` shows
///   the exit and names that file as the mount's host side (where the kubelet reads
///   the message), which holds the message;
/// - /etc/hosts and /etc/resolv.conf as CRI passes them, a host-side update of
///   resolv.conf seen;
/// - a character device as hostPath: the create fails naming it;
/// - the share as virtiofsd sees it (its root, through /proc): links planted where
///   the shim works, a container directory renamed, a mount point removed, a
///   directory for a container to come, a write into the read-only volume, all
///   refused with EROFS; a write into the container's rootfs (the guest's own)
///   reaches the container;
/// - stopp/rmp: nothing left, no mount on any of the host paths, the directory the
///   planted links pointed at unchanged.
fn pod_volumes(version: Version) {
    let c = containerd(version);
    let base = std::env::temp_dir().join(format!("vfvm-volumes-{}-{}", version.name(), std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let (config, hostpath, empty_dir, canary) = (base.join("config"), base.join("hostpath"), base.join("empty-dir"), base.join("canary"));
    for d in [&config, &hostpath, &empty_dir, &canary] {
        std::fs::create_dir_all(d).unwrap();
    }
    let termination_log = base.join("termination-log");
    std::fs::write(&termination_log, "").unwrap();
    let exit_log = base.join("termination-log-t");
    std::fs::write(&exit_log, "").unwrap();
    // An emptyDir with `medium: Memory` as the kubelet makes it: a tmpfs at its emptyDir path.
    let memory = base.join("pod-uid/volumes/kubernetes.io~empty-dir/cache");
    std::fs::create_dir_all(&memory).unwrap();
    let tmpfs = Command::new("mount").args(["-t", "tmpfs", "tmpfs"]).arg(&memory).status().unwrap();
    assert!(tmpfs.success(), "mounting a tmpfs at {}", memory.display());
    std::fs::write(canary.join("keep"), "mine").unwrap();
    std::fs::write(hostpath.join("from-host-1"), "h1").unwrap();
    write_config_map(&config, "2026_12_04_a", "v1").unwrap();
    let v = version.name();
    scenario(&format!("pod-volumes-{v}"), &c, |cri| {
        let pod_file = cri.pod_config("volumes")?;
        let pod = cri.runp("kata", &pod_file)?;
        let deadline = Instant::now() + CALL_LIMIT;
        let a_file = cri.container_config_mounts(
            "a",
            "exec sleep 3600",
            &[
                (&config, "/config", true),
                (&hostpath, "/data", false),
                (&empty_dir, "/scratch", false),
                (&termination_log, "/dev/termination-log", false),
                (&memory, "/cache", false),
            ],
        )?;
        let a = cri.create_and_start(&pod, &a_file, &pod_file)?;
        let b = cri.create_and_start(
            &pod,
            &cri.container_config_mounts("b", "exec sleep 3600", &[(&empty_dir, "/scratch", false), (&memory, "/cache", false)])?,
            &pod_file,
        )?;
        cri.wait_running(&a, deadline)?;
        cri.wait_running(&b, deadline)?;

        // configMap: read-only, switched on the host.
        let first = cat(cri, &a, "/config/key")?;
        ensure!(first == "v1", "the configMap's first value: {first:?}");
        let (code, _, stderr) = cri.exec(&a, &["sh", "-c", "echo evil > /config/key"])?;
        ensure!(code != 0 && stderr.contains("Read-only file system"), "a write to the read-only volume: exit {code}, {stderr}");
        let switched = Instant::now();
        write_config_map(&config, "2026_12_04_b", "v2")?;
        let seen = loop {
            if cat(cri, &a, "/config/key")? == "v2" {
                break switched.elapsed();
            }
            ensure!(switched.elapsed() < Duration::from_secs(15), "the switched configMap was not seen within 15 s");
            std::thread::sleep(POLL_INTERVAL);
        };
        ensure!(std::fs::read_to_string(config.join("..2026_12_04_a").join("key"))? == "v1", "the host's old data changed");

        // hostPath, both ways; emptyDir between the pod's containers; the termination log.
        let (code, _, stderr) =
            cri.exec(&a, &["sh", "-c", "echo c1 > /data/from-container; echo shared > /scratch/msg; echo bye > /dev/termination-log"])?;
        ensure!(code == 0, "writing the volumes: exit {code}, {stderr}");
        ensure!(std::fs::read_to_string(hostpath.join("from-container"))? == "c1\n", "the hostPath write should reach the host");
        std::fs::write(hostpath.join("from-host-2"), "h2")?;
        ensure!(
            cat(cri, &a, "/data/from-host-2")? == "h2" && cat(cri, &a, "/data/from-host-1")? == "h1",
            "host files in the hostPath volume"
        );
        ensure!(cat(cri, &b, "/scratch/msg")? == "shared\n", "the emptyDir between the pod's containers");
        ensure!(
            std::fs::read_to_string(&termination_log)? == "bye\n",
            "the termination message should be in the host file the kubelet reads"
        );
        // A container that writes its message and exits, read as the kubelet reads it:
        // the host side of the mount CRI's status lists at the termination path.
        let t = cri.create_and_start(
            &pod,
            &cri.container_config_mounts(
                "t",
                "echo finished-badly > /dev/termination-log; exit 3",
                &[(&exit_log, "/dev/termination-log", false)],
            )?,
            &pod_file,
        )?;
        let status = loop {
            let status = cri.inspect("inspect", &t)?["status"].clone();
            if status["state"] == "CONTAINER_EXITED" {
                break status;
            }
            ensure!(Instant::now() < deadline, "container t did not exit: {status}");
            std::thread::sleep(POLL_INTERVAL);
        };
        let host_side = status["mounts"]
            .as_array()
            .and_then(|ms| ms.iter().find(|m| m["containerPath"] == "/dev/termination-log"))
            .and_then(|m| m["hostPath"].as_str())
            .with_context(|| format!("crictl inspect lists no termination-log mount: {status}"))?
            .to_string();
        let message = std::fs::read_to_string(&host_side)?;
        ensure!(
            status["exitCode"] == 3 && message == "finished-badly\n",
            "the exited container's status (exit {}) and termination message {message:?} at {host_side}",
            status["exitCode"]
        );

        // The Memory emptyDir: one tmpfs in the guest for both containers; the host's stays empty.
        let (code, stdout, stderr) =
            cri.exec(&a, &["sh", "-c", "echo in-memory > /cache/m && awk '$2 == \"/cache\" { print $3 }' /proc/mounts"])?;
        ensure!(code == 0 && stdout.starts_with("tmpfs\n"), "the Memory emptyDir in the guest: exit {code}, {stdout:?}, {stderr}");
        ensure!(cat(cri, &b, "/cache/m")? == "in-memory\n", "the Memory emptyDir between the pod's containers");
        ensure!(std::fs::read_dir(&memory)?.count() == 0, "the host's tmpfs should stay unused");

        // /etc/hosts and /etc/resolv.conf as CRI passes them.
        let spec = cri.inspect("inspect", &a)?["info"]["runtimeSpec"]["mounts"].clone();
        let source = |dest: &str| -> Result<PathBuf> {
            spec.as_array()
                .and_then(|m| m.iter().find(|m| m["destination"] == dest))
                .and_then(|m| m["source"].as_str())
                .map(PathBuf::from)
                .with_context(|| format!("no {dest} mount in the container's spec: {spec}"))
        };
        let (hosts, resolv) = (source("/etc/hosts")?, source("/etc/resolv.conf")?);
        ensure!(cat(cri, &a, "/etc/hosts")? == std::fs::read_to_string(&hosts)?, "/etc/hosts as CRI passed it ({})", hosts.display());
        std::fs::write(&resolv, format!("{}options ndots:7\n", std::fs::read_to_string(&resolv)?))?;
        ensure!(cat(cri, &a, "/etc/resolv.conf")?.contains("options ndots:7"), "a host-side update of {}", resolv.display());

        // A device cannot be shared: named, and the pod goes on.
        let dev_file = cri.container_config_mounts("dev", "exec sleep 3600", &[(Path::new("/dev/null"), "/dev-null", false)])?;
        // CRI's create only records the container; the runtime sees it at start.
        let dev = cri.ok(&["create", "--no-pull", &pod, &dev_file, &pod_file])?;
        let out = cri.run(&["start", &dev])?;
        let error = crictl_error(&String::from_utf8_lossy(&out.stderr));
        ensure!(
            !out.status.success() && error.contains("bind mount /dev/null -> /dev-null: a character device"),
            "a /dev/null hostPath: {error}"
        );
        cri.ok(&["rm", &dev])?;

        // The share as virtiofsd serves it to the guest.
        let fsd_root = pids_named("virtiofsd")
            .into_iter()
            .map(|pid| PathBuf::from(format!("/proc/{pid}/root")))
            .find(|root| root.join(&a).is_dir())
            .context("no virtiofsd whose root holds the container's directory")?;
        let files = |suffix: &str| -> Result<PathBuf> {
            std::fs::read_dir(fsd_root.join(&a).join("files"))?
                .filter_map(|e| e.ok())
                .map(|e| e.path())
                .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().ends_with(suffix)))
                .with_context(|| format!("no {suffix} in the container's files"))
        };
        let attempts: Vec<(String, std::io::Result<()>)> = vec![
            (format!("link {a}/files.next"), std::os::unix::fs::symlink(&canary, fsd_root.join(&a).join("files.next"))),
            (format!("link {pod}/rootfs.next"), std::os::unix::fs::symlink(&canary, fsd_root.join(&pod).join("rootfs.next"))),
            (format!("rename {a}"), std::fs::rename(fsd_root.join(&a), fsd_root.join("moved"))),
            ("remove the termination log's mount point".into(), std::fs::remove_file(files("-termination-log")?)),
            ("make a directory for a container to come".into(), std::fs::create_dir(fsd_root.join("to-come"))),
            ("write into the read-only volume".into(), std::fs::write(files("-config")?.join("new"), "x")),
        ];
        for (what, result) in &attempts {
            ensure!(
                result.as_ref().err().and_then(std::io::Error::raw_os_error) == Some(libc::EROFS),
                "{what} through virtiofsd's view should fail with EROFS: {result:?}"
            );
        }
        std::fs::write(fsd_root.join(&a).join("rootfs").join("tmp").join("via-virtiofsd"), "guest's own")?;
        ensure!(cat(cri, &a, "/tmp/via-virtiofsd")? == "guest's own", "virtiofsd's view is the container's");

        cri.remove_pod(&pod)?;
        wait_nothing_left("after the pod with volumes")?;
        let unmounted = Command::new("umount").arg(&memory).status()?;
        ensure!(unmounted.success(), "unmounting the test's tmpfs at {}", memory.display());
        let mounts = std::fs::read_to_string("/proc/self/mountinfo")?;
        let left: Vec<&str> =
            mounts.lines().filter(|l| l.split(' ').nth(4).is_some_and(|p| p.starts_with(base.to_str().unwrap_or("-")))).collect();
        ensure!(left.is_empty(), "mounts left on the volumes: {left:?}");
        ensure!(std::fs::read_dir(&canary)?.count() == 1 && std::fs::read_to_string(canary.join("keep"))? == "mine", "the canary changed");
        print_figures(&format!(
            "containerd {v}, pod volumes: configMap switch seen after {:.1} s, its write refused; hostPath both ways; emptyDir between 2 containers; \
             termination message on the host, and of an exited container where crictl inspect names it; Memory emptyDir a tmpfs in the guest shared by both; hosts/resolv.conf as CRI passed them, resolv.conf update seen; /dev/null refused; \
             {} writes through virtiofsd's view refused (EROFS), the rootfs write seen",
            seen.as_secs_f64(),
            attempts.len()
        ));
        Ok(())
    });
    c.stop().unwrap();
    std::fs::remove_dir_all(&base).unwrap();
}

#[test]
#[ignore = "needs the lab: run by cargo xtask test"]
fn lab_cri_pod_volumes_are_shared_live_and_the_share_is_read_only_containerd_2_1() {
    pod_volumes(Version::V2_1);
}

#[test]
#[ignore = "needs the lab: run by cargo xtask test"]
fn lab_cri_pod_volumes_are_shared_live_and_the_share_is_read_only_containerd_1_6() {
    pod_volumes(Version::V1_6);
}

fn task_metric(c: &Containerd, id: &str, name: &str) -> Result<u64> {
    let table = c.ctr_ok_in(CRI_NAMESPACE, &["task", "metrics", id])?;
    table
        .lines()
        .find_map(|l| {
            let mut words = l.split_whitespace();
            (words.next() == Some(name)).then(|| words.next()?.parse().ok()).flatten()
        })
        .with_context(|| format!("ctr task metrics {id}: no {name} in:\n{table}"))
}

/// A container limited to 512 MiB that allocates 600 MiB, in `pod`: it must end
/// OOM-killed (exit 137), as CRI reports it; its status.
fn oom_killed_beyond_its_limit(cri: &Cri, pod: &str, pod_file: &str, deadline: Instant) -> Result<Value> {
    let v = cri.c.version().name();
    let small = cri.create_and_start(
        pod,
        &cri.container_config_limited("small", "exec dd if=/dev/zero of=/dev/null bs=600M count=1", 100_000, 512 * MIB)?,
        pod_file,
    )?;
    let status = loop {
        let status = cri.inspect("inspect", &small)?;
        if status["status"]["state"] == "CONTAINER_EXITED" && status["status"]["reason"] == "OOMKilled" {
            break status;
        }
        ensure!(Instant::now() < deadline, "the container over its limit should have exited OOMKilled: {}", status["status"]);
        std::thread::sleep(POLL_INTERVAL);
    };
    eprintln!(
        "containerd {v}: the container over its 512 MiB: state {}, reason {}, exit code {}",
        status["status"]["state"], status["status"]["reason"], status["status"]["exitCode"]
    );
    ensure!(status["status"]["exitCode"] == 137, "an OOM-killed container exits 137: {}", status["status"]);
    Ok(status)
}

/// The pod's VM sized from the pod's resources (issue 18). A pod whose two
/// containers are limited to 1 CPU + 768 MiB and 1 CPU + 512 MiB (the kubelet puts
/// the sums, 2 CPUs and 1280 MiB, in the pod's resources; containerd, 1.6.20 as 2.x,
/// passes them on as the sandbox annotations) gets the base (1 vCPU, 512 MiB) plus
/// 2 vCPUs and 1280 MiB: the VMM's status and the guest's /proc say so. The first
/// container allocates 700 MiB within its 768 and runs on; the second allocates
/// beyond its 512 and is OOM-killed, which CRI reports as OOMKilled. `crictl update
/// --memory` changes the limit the guest applies; `ctr task metrics` shows the
/// container's limit and, for the pod (its sandbox task), the VM. A container whose
/// limit is more than the VM fails its create naming both figures; a pod over the
/// runtime's maximums fails runp naming its figures; nothing is left of either.
///
/// `pod_cpus`: the pod's CPU limit. Under containerd 1.6 the test gives the pod no
/// CPU limit (a VM of 1 vCPU), to spend less time in the lab's fault-prone 3-vCPU
/// guests (see "Faults of the lab's emulated SVM" in the README); 1.6's passing of
/// the CPU annotations shows in the refused pod's figures.
///
/// `allocate`: run the 700 MiB allocation and the OOM kill. The full 2.1 test does
/// (the issue asks them of it); the tests `cargo xtask test` runs leave them out: a
/// guest faulting in hundreds of MiB triple-faults in about two of five lab runs,
/// even with one vCPU, and has reset L2 itself.
fn pod_sized_from_its_resources(version: Version, pod_cpus: i64, allocate: bool) {
    let c = containerd(version);
    scenario(&format!("pod-sizing-{}", version.name()), &c, |cri| {
        let v = version.name();
        // More than the config's 16384 MiB: refused at runp, nothing left.
        let huge = cri.pod_config_with_resources("too-big", 100_000, 16384 * MIB)?;
        let out = cri.run(&["runp", "--runtime", "kata", &huge])?;
        let error = crictl_error(&String::from_utf8_lossy(&out.stderr));
        ensure!(
            !out.status.success() && error.contains("a VM of 2 vCPUs and 16896 MiB") && error.contains("at most 8 vCPUs and 16384 MiB"),
            "a pod over the maximum should fail runp naming its figures; exit {}, error: {error}",
            out.status
        );
        eprintln!("containerd {v}: a pod over the maximum: {error}");
        ensure!(cri.ids(&["pods", "-q"])?.is_empty(), "the refused pod is still listed");
        wait_nothing_left("after the refused pod")?;

        let file = cri.pod_config_with_resources("sized", pod_cpus * 100_000, 1280 * MIB)?;
        let pod = cri.runp("kata", &file)?;
        let annotations =
            std::fs::read_to_string(c.state().join("io.containerd.runtime.v2.task").join(CRI_NAMESPACE).join(&pod).join("config.json"))
                .ok()
                .and_then(|t| serde_json::from_str::<Value>(&t).ok())
                .map(|spec| spec["annotations"].clone())
                .unwrap_or_default();
        let passed: Vec<String> =
            ["io.kubernetes.cri.sandbox-cpu-quota", "io.kubernetes.cri.sandbox-cpu-period", "io.kubernetes.cri.sandbox-memory"]
                .iter()
                .map(|k| format!("{k}={}", annotations[*k]))
                .collect();
        eprintln!("containerd {v}: the sandbox's annotations: {}", passed.join(", "));
        let size = vm_size(&pod)?;
        eprintln!("containerd {v}: the VMM reports {} vCPUs and {} MiB", size.0, size.1);
        let want_vcpus = 1 + u32::try_from(pod_cpus)?;
        ensure!(
            size == (want_vcpus, 512 + 1280),
            "a VM of {want_vcpus} vCPUs and 1792 MiB expected (base 1 + {pod_cpus}, 512 + 1280); the VMM reports {size:?}"
        );

        let deadline = Instant::now() + CALL_LIMIT;
        let script = if allocate {
            "dd if=/dev/zero of=/dev/null bs=700M count=1 && echo allocated-700-MiB; exec sleep 3600"
        } else {
            "exec sleep 3600"
        };
        let big = cri.create_and_start(&pod, &cri.container_config_limited("big", script, 100_000, 768 * MIB)?, &file)?;
        cri.wait_running(&big, deadline)?;
        if allocate {
            cri.wait_logs(&big, "allocated-700-MiB", deadline)?;
            cri.wait_running(&big, deadline)?;
        }
        let (code, meminfo, _) = cri.exec(&big, &["cat", "/proc/meminfo"])?;
        let mem_total_kib: i64 = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:")?.split_whitespace().next()?.parse().ok())
            .with_context(|| format!("no MemTotal in the guest's /proc/meminfo: {meminfo:?}"))?;
        let (_, cpuinfo, _) = cri.exec(&big, &["grep", "-c", "^processor", "/proc/cpuinfo"])?;
        eprintln!("containerd {v}: the guest sees {} CPUs and MemTotal {} MiB", cpuinfo.trim(), mem_total_kib / 1024);
        // The kernel keeps a little of the RAM for itself (its image, page tables).
        ensure!(
            code == 0 && mem_total_kib * 1024 <= 1792 * MIB && mem_total_kib * 1024 > 1792 * MIB - 160 * MIB,
            "the guest's MemTotal should be a little under 1792 MiB: {mem_total_kib} KiB"
        );
        ensure!(cpuinfo.trim() == want_vcpus.to_string(), "the guest should have {want_vcpus} CPUs: {cpuinfo:?}");

        // Beyond its limit: OOM-killed, and CRI says so.
        let oom = if allocate { Some(oom_killed_beyond_its_limit(cri, &pod, &file, deadline)?) } else { None };
        cri.wait_running(&big, deadline)?;

        // Limits seen in stats: the container's own, and the VM's for the pod.
        let limit = task_metric(cri.c, &big, "memory.usage_limit")?;
        ensure!(limit == 768 << 20, "ctr task metrics {big}: memory.usage_limit {limit}, 768 MiB expected");
        let vm_limit = task_metric(cri.c, &pod, "memory.usage_limit")?;
        ensure!(
            i64::try_from(vm_limit).ok() == Some(mem_total_kib * 1024),
            "ctr task metrics of the pod: memory.usage_limit {vm_limit}, the VM's MemTotal {} expected",
            mem_total_kib * 1024
        );
        eprintln!("containerd {v}: metrics: container limit {} MiB, pod (the VM) {} MiB", limit >> 20, vm_limit >> 20);

        // crictl update reaches the guest's cgroup.
        cri.ok(&["update", "--memory", &(300 * MIB).to_string(), &big])?;
        let (code, max, _) = cri.exec(&big, &["cat", &format!("/sys/fs/cgroup/vfvm/{big}/memory.max")])?;
        ensure!(
            code == 0 && max.trim() == (300 * MIB).to_string(),
            "after crictl update --memory 300 MiB the guest's memory.max reads {max:?}"
        );
        ensure!(task_metric(cri.c, &big, "memory.usage_limit")? == 300 << 20, "metrics after the update");
        eprintln!("containerd {v}: crictl update --memory 300 MiB: the guest's memory.max reads {}", max.trim());

        // More than the whole VM: the container fails, naming both figures. CRI's
        // CreateContainer only records it; StartContainer creates the task, in the VM.
        let too_big = cri.container_config_limited("too-big", "exec sleep 3600", 100_000, 4096 * MIB)?;
        let too_big = cri.ok(&["create", "--no-pull", &pod, &too_big, &file])?;
        let out = cri.run(&["start", &too_big])?;
        let error = crictl_error(&String::from_utf8_lossy(&out.stderr));
        ensure!(
            !out.status.success()
                && error.contains("4096 MiB")
                && error.contains("does not fit in the pod's VM")
                && error.contains(&format!("{} MiB", mem_total_kib / 1024)),
            "a container limited beyond the VM should fail its create naming both figures; exit {}, error: {error}",
            out.status
        );
        eprintln!("containerd {v}: a container limited to 4096 MiB: {error}");
        let refused = cri.inspect("inspect", &too_big)?;
        ensure!(refused["status"]["state"] != "CONTAINER_RUNNING", "the refused container runs: {}", refused["status"]);
        cri.ok(&["rm", &too_big])?;
        ensure!(!cri.ids(&["ps", "-a", "-q"])?.contains(&too_big), "the refused container is still listed after rm");

        cri.remove_pod(&pod)?;
        ensure!(cri.ids(&["pods", "-q"])?.is_empty(), "pods left in CRI");
        wait_nothing_left("after the sized pod")?;
        let allocation = match &oom {
            Some(status) => {
                format!("700 MiB within 768: ran; beyond 512: {} (exit {})", status["status"]["reason"], status["status"]["exitCode"])
            }
            None => "allocations not run (the byhand_cri_pod test runs them)".to_string(),
        };
        print_figures(&format!(
            "containerd {v}, pod sizing: pod {pod_cpus} CPU + 1280 MiB -> VMM {} vCPUs, {} MiB; guest {} CPUs, MemTotal {} MiB; \
             {allocation}; metrics: container {} MiB, pod (VM) {} MiB; \
             update --memory 300 MiB -> memory.max {}; a 4096 MiB limit and a 16 GiB pod refused",
            size.0,
            size.1,
            cpuinfo.trim(),
            mem_total_kib / 1024,
            limit >> 20,
            vm_limit >> 20,
            max.trim()
        ));
        Ok(())
    });
    c.stop().unwrap();
}

/// The short version `cargo xtask test` runs: the sizing, the limits, the update,
/// the metrics and the refusals, in a 1-vCPU guest that allocates nothing large. In
/// the CI run of 2026-12-04 the full version below reset L2 itself twice in a row
/// (L2's CPU triple-faulting under TCG's emulated SVM, see "Faults of the lab's
/// emulated SVM" in the README), and an L2 crash ends every in-lab test after it.
#[test]
#[ignore = "needs the lab: run by cargo xtask test"]
fn lab_cri_pod_vm_sized_from_its_resources_containerd_2_1() {
    pod_sized_from_its_resources(Version::V2_1, 0, false);
}

/// The issue's acceptance in full (3 vCPUs, 700 MiB allocated within a 768 MiB
/// limit, one container OOM-killed beyond 512 MiB), outside the test command:
/// `cargo xtask lab test --filter byhand_cri_pod target/debug/deps/lab_cri-*`.
#[test]
#[ignore = "needs the lab and is fault-prone there: cargo xtask lab test --filter byhand_cri_pod (see the README)"]
fn byhand_cri_pod_vm_sized_from_its_resources_containerd_2_1() {
    pod_sized_from_its_resources(Version::V2_1, 2, true);
}

#[test]
#[ignore = "needs the lab: run by cargo xtask test"]
fn lab_cri_pod_vm_sized_from_its_resources_containerd_1_6() {
    pod_sized_from_its_resources(Version::V1_6, 0, false);
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

/// The benchmark's sizes: MiB written and read, files created, listed and removed.
#[derive(Clone, Copy)]
struct VolumeWork {
    mib: usize,
    files: usize,
}

/// The full benchmark's work (the README's figures).
const FULL_VOLUME_WORK: VolumeWork = VolumeWork { mib: 64, files: 1000 };
/// The test command's: a quarter, since each vfvm round is an L3 VM doing heavy I/O,
/// which the lab's emulated SVM now and then triple-faults (the longer, the likelier).
const SHORT_VOLUME_WORK: VolumeWork = VolumeWork { mib: 16, files: 250 };

/// The shared-volume benchmark's work, as the container's command: a sequential
/// write (fsynced, so it reaches the host) and read (of a file the host wrote, in the host's page cache), then files created, listed with their
/// attributes and removed by name (not `rm -r`: on a tmpfs-backed directory, as the
/// lab's are, virtiofsd's readdir after unlinks skips entries; see the README).
/// Timed inside the container by the kernel clock
/// (`adjtimex`: busybox's `date` has no sub-second format), so the exec path is not
/// measured; prints one `bench-volume` line, then waits to be removed.
fn volume_bench_script(work: VolumeWork) -> String {
    let VolumeWork { mib, files } = work;
    format!(
        r#"set -e
us() {{ set -- $(adjtimex | sed -n 's/.*tv_sec: *//p; s/.*tv_usec: *//p'); echo $(( $1 * 1000000 + $2 )); }}
cd /vol
t0=$(us); dd if=/dev/zero of=out bs=1M count={mib} conv=fsync 2>/dev/null; t1=$(us)
dd if=input of=/dev/null bs=1M 2>/dev/null; t2=$(us)
mkdir m; i=0; while [ $i -lt {files} ]; do : > m/f$i; i=$((i+1)); done; t3=$(us)
ls -l m > /dev/null; t4=$(us)
i=0; while [ $i -lt {files} ]; do rm m/f$i; i=$((i+1)); done; rmdir m; t5=$(us)
echo "bench-volume write_us=$((t1-t0)) read_us=$((t2-t1)) create_us=$((t3-t2)) stat_us=$((t4-t3)) unlink_us=$((t5-t4))"
exec sleep 3600"#
    )
}

/// The benchmark's phases, in the order the script prints them.
const VOLUME_PHASES: [&str; 5] = ["write", "read", "create", "stat", "unlink"];

/// One round of the shared-volume benchmark in a pod of `handler`: the phases'
/// times, after checking that the work reached the host's directory.
fn volume_bench_round(cri: &Cri, handler: &str, n: usize, dir: &Path, work: VolumeWork) -> Result<Vec<Duration>> {
    std::fs::create_dir_all(dir)?;
    // The read's input, written on the host: in its page cache, as a pod's data would be.
    std::fs::write(dir.join("input"), vec![0x5au8; work.mib << 20])?;
    let name = format!("volume-{handler}-{n}");
    let pod_file = cri.pod_config(&name)?;
    let pod = cri.runp(handler, &pod_file)?;
    let container_file = cri.container_config_mounts(&format!("{name}-c"), &volume_bench_script(work), &[(dir, "/vol", false)])?;
    let id = cri.create_and_start(&pod, &container_file, &pod_file)?;
    // Until the line is logged; a container that ended without it (its VM gone, say)
    // fails the round at once rather than at the deadline.
    let deadline = Instant::now() + CALL_LIMIT;
    let log = loop {
        let log = String::from_utf8_lossy(&cri.run(&["logs", &id])?.stdout).into_owned();
        if log.contains("bench-volume ") {
            break log;
        }
        let status = cri.inspect("inspect", &id)?["status"].clone();
        ensure!(
            status["state"] != "CONTAINER_EXITED",
            "{handler}: the benchmark's container exited {} without its figures: {log}",
            status["exitCode"]
        );
        ensure!(Instant::now() < deadline, "{handler}: no figures from the benchmark's container after {CALL_LIMIT:?}: {log}");
        std::thread::sleep(POLL_INTERVAL);
    };
    cri.remove_pod(&pod)?;
    let line = log.lines().find(|l| l.contains("bench-volume ")).context("no bench-volume line")?;
    let mut times = Vec::new();
    for phase in VOLUME_PHASES {
        let key = format!("{phase}_us=");
        let us: u64 = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix(key.as_str()))
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("{handler}: no {key} in {line:?}"))?;
        times.push(Duration::from_micros(us));
    }
    let written =
        std::fs::metadata(dir.join("out")).with_context(|| format!("{handler}: the container's write did not reach the host"))?.len();
    ensure!(
        written == u64::try_from(work.mib << 20)?,
        "{handler}: the host sees {written} bytes of the container's {} MiB write",
        work.mib
    );
    ensure!(!dir.join("m").exists(), "{handler}: the container's removed files are still on the host");
    std::fs::remove_dir_all(dir)?;
    Ok(times)
}

/// Issue #17's benchmark: the same work on a shared (hostPath) volume in a vfvm pod
/// and in a runc pod, alternating, `rounds` rounds in one lab run; prints each
/// phase's medians and the ratios vfvm/runc.
fn bench_shared_volume(rounds: usize, work: VolumeWork) {
    let c = containerd(Version::V2_1);
    let base = std::env::temp_dir().join(format!("vfvm-volume-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    scenario("bench-volume", &c, |cri| {
        let (mut vfvm, mut runc) = (Vec::new(), Vec::new());
        for n in 0..rounds {
            runc.push(volume_bench_round(cri, "runc", n, &base.join(format!("runc-{n}")), work)?);
            vfvm.push(volume_bench_round(cri, "kata", n, &base.join(format!("vfvm-{n}")), work)?);
        }
        let mut lines = vec![format!(
            "shared volume (hostPath, read-write), containerd 2.1, medians of {rounds} round(s), vfvm pod vs runc pod (lab L2 under TCG):"
        )];
        for (i, phase) in VOLUME_PHASES.iter().enumerate() {
            let v = median(vfvm.iter().map(|r| r[i]).collect());
            let r = median(runc.iter().map(|r| r[i]).collect());
            let VolumeWork { mib, files } = work;
            let what = match *phase {
                "write" => format!("{mib} MiB sequential write + fsync"),
                "read" => format!("{mib} MiB sequential read"),
                "create" => format!("{files} files created"),
                "stat" => format!("{files} files listed with attributes"),
                _ => format!("{files} files removed"),
            };
            lines.push(format!(
                "  {what}: vfvm {:.3} s, runc {:.3} s, ratio vfvm/runc {:.1}",
                v.as_secs_f64(),
                r.as_secs_f64(),
                v.as_secs_f64() / r.as_secs_f64().max(1e-6)
            ));
        }
        print_figures(&lines.join("\n"));
        ensure!(cri.ids(&["pods", "-q"])?.is_empty(), "pods left in CRI");
        wait_nothing_left("after the volume benchmark")
    });
    let _ = std::fs::remove_dir_all(&base);
    c.stop().unwrap();
}

/// The benchmark's short version in the test command: one round of
/// [`SHORT_VOLUME_WORK`].
#[test]
#[ignore = "needs the lab: run by cargo xtask test"]
fn lab_cri_bench_shared_volume_vfvm_vs_runc() {
    bench_shared_volume(1, SHORT_VOLUME_WORK);
}

/// The full benchmark, whose figures the README records: [`BENCH_ROUNDS`] rounds.
/// `cargo xtask lab test --filter byhand_cri_bench_shared_volume target/debug/deps/lab_cri-*`.
#[test]
#[ignore = "needs the lab; the full run, by hand: cargo xtask lab test --filter byhand_cri_bench_shared_volume (see the README)"]
fn byhand_cri_bench_shared_volume_vfvm_vs_runc() {
    bench_shared_volume(BENCH_ROUNDS, FULL_VOLUME_WORK);
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
            // Beside the VF, the pod's eth0 (the bridge CNI's veth, on a tap).
            let (code, gw, _) = cri.exec(&ctr, &["ping", "-c", "2", "-W", "10", "198.19.0.1"])?;
            ensure!(
                code == 0 && !gw.contains(" 0 packets received"),
                "beside its VF, the pod's eth0 should reach the bridge's gateway: {gw}"
            );
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

/// L2 as the router between the CRI pods' bridge and the lab's peer: an address on
/// the PF's wire, and the peer's route back to the pods' subnet; undone on drop.
struct PeerRoute {
    pf: String,
}

const L2_WIRE_ADDR: &str = "198.18.0.250/24";

impl PeerRoute {
    fn add() -> Result<PeerRoute> {
        let pf = igb_vfs::igb_pf().and_then(|pf| igb_vfs::netdev_of(&pf)).context("the lab's igb PF has no netdev in L2")?;
        let ip = |args: &[&str]| -> Result<()> {
            let out = Command::new("ip").args(args).output()?;
            ensure!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
            Ok(())
        };
        ip(&["addr", "add", L2_WIRE_ADDR, "dev", &pf])?;
        let route = PeerRoute { pf: pf.clone() };
        ip(&["link", "set", "dev", &pf, "up"])?;
        ip(&["-n", PEER_NETNS, "route", "add", vfvm_test_containerd::CNI_SUBNET, "via", "198.18.0.250"])?;
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")?;
        Ok(route)
    }
}

impl Drop for PeerRoute {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["-n", PEER_NETNS, "route", "del", vfvm_test_containerd::CNI_SUBNET]).status();
        let _ = Command::new("ip").args(["addr", "del", L2_WIRE_ADDR, "dev", &self.pf]).status();
    }
}

/// An HTTP GET from this host (L2) to `ip:port`: the whole answer.
fn http_get(ip: &str, port: u16) -> Result<String> {
    use std::io::{Read, Write};
    let addr: std::net::SocketAddr = format!("{ip}:{port}").parse()?;
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(20)).with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    s.write_all(b"GET / HTTP/1.0\r\nHost: vfvm\r\n\r\n")?;
    let mut answer = String::new();
    s.take(1 << 20).read_to_string(&mut answer).with_context(|| format!("reading {addr}'s answer"))?;
    Ok(answer)
}

/// The tap links (`*_vfvm`) in the network namespace at `netns` (a pod's, still there),
/// and whether its `eth0` has an ingress qdisc.
fn taps_in(netns: &Path) -> Result<(String, bool)> {
    let ns = vfvm_netlink::Netns::open(netns).with_context(|| format!("opening {}", netns.display()))?;
    let h = vfvm_netlink::Handle::in_netns(&ns)?;
    let links = h.links()?;
    let taps: Vec<String> = links.iter().filter(|l| l.name.ends_with("_vfvm")).map(|l| l.name.clone()).collect();
    let eth0_qdisc = match links.iter().find(|l| l.name == "eth0") {
        Some(l) => h.has_ingress_qdisc(l.index)?,
        None => false,
    };
    Ok((taps.join(" "), eth0_qdisc))
}

const HTTPD_BODY: &str = "vfvm-pod-httpd-answers";
const POD_DNS_SERVER: &str = "198.19.0.53";

/// #16: every vfvm pod gets its eth0 from the bridge CNI (a virtio-net device on a
/// tap joined to the pod's veth). A container in a vfvm pod reaches the bridge's
/// gateway, a runc pod, another vfvm pod and the lab's peer; the runc pod and the
/// other vfvm pod reach it; its busybox httpd answers this host at the pod IP; its
/// /etc/resolv.conf holds the pod's DNS config; the other vfvm pod, with 2 vCPUs, has
/// a 2-queue eth0. stopp/rmp: no tap, filter, process or state left, CNI DEL released
/// the addresses. A netns holding a bare tun: the
/// start fails naming it, nothing left.
fn pod_network(version: Version) {
    let c = containerd(version);
    let peer = PeerRoute::add().unwrap();
    scenario(&format!("pod-network-{}", version.name()), &c, |cri| {
        let dns = json!({"servers": [POD_DNS_SERVER], "searches": ["vfvm.test"], "options": ["ndots:2"]});
        // Pod B's VM has 2 vCPUs: its eth0 is a 2-queue-pair device (a 2-queue tap).
        let fb = cri.pod_config_annotated("net-b", &[("io.katacontainers.config.hypervisor.default_vcpus", "2")])?;
        let (fa, fr) = (cri.pod_config_dns("net-a", dns)?, cri.pod_config("net-r")?);
        let a = cri.runp("kata", &fa)?;
        let b = cri.runp("rune", &fb)?;
        let r = cri.runp("runc", &fr)?;
        let (ip_a, ip_b, ip_r) = (cri.pod_ip(&a)?, cri.pod_ip(&b)?, cri.pod_ip(&r)?);
        eprintln!("containerd {}: vfvm pods at {ip_a} and {ip_b}, runc pod at {ip_r}", version.name());
        let deadline = Instant::now() + CALL_LIMIT;
        let httpd = format!("mkdir -p /www && echo {HTTPD_BODY} > /www/index.html && exec httpd -f -p 8080 -h /www");
        let ca = cri.create_and_start(&a, &cri.container_config("web", &httpd)?, &fa)?;
        let cb = cri.create_and_start(&b, &cri.container_config("b", "exec sleep 3600")?, &fb)?;
        let cr = cri.create_and_start(&r, &cri.container_config("r", "exec sleep 3600")?, &fr)?;
        for id in [&ca, &cb, &cr] {
            cri.wait_running(id, deadline)?;
        }
        // The guest's eth0: the pod's address and default route.
        let (_, addr, _) = cri.exec(&ca, &["ip", "-o", "addr", "show", "eth0"])?;
        ensure!(addr.contains(&format!("inet {ip_a}/24")), "the guest's eth0 should hold the pod IP {ip_a}: {addr}");
        let (_, routes, _) = cri.exec(&ca, &["ip", "route"])?;
        ensure!(routes.contains("default via 198.19.0.1 dev eth0"), "the guest's default route: {routes}");
        let (_, queues, _) = cri.exec(&cb, &["ls", "/sys/class/net/eth0/queues"])?;
        let tx_queues = queues.split_whitespace().filter(|q| q.starts_with("tx-")).count();
        ensure!(tx_queues == 2, "pod B's 2-vCPU guest should have a 2-queue eth0: {queues:?}");

        let ping = |from: &str, to: &str, what: &str| -> Result<()> {
            let (code, out, err) = cri.exec(from, &["ping", "-c", "2", "-W", "10", to])?;
            ensure!(code == 0 && !out.contains(" 0 packets received"), "{what} ({to}) should answer a ping: exit {code}, {out} {err}");
            Ok(())
        };
        ping(&ca, "198.19.0.1", "the bridge's gateway")?;
        ping(&ca, &ip_r, "the runc pod")?;
        ping(&ca, &ip_b, "the other vfvm pod")?;
        ping(&ca, PEER_ADDR, "the lab's peer")?;
        ping(&cb, &ip_a, "the vfvm pod, from the other vfvm pod")?;
        ping(&cr, &ip_a, "the vfvm pod, from the runc pod")?;
        let (code, body, err) = cri.exec(&cr, &["wget", "-q", "-O", "-", &format!("http://{ip_a}:8080/")])?;
        ensure!(code == 0 && body.contains(HTTPD_BODY), "the runc pod's wget of the vfvm pod's httpd: exit {code}, {body:?} {err}");
        let answer = http_get(&ip_a, 8080)?;
        ensure!(answer.starts_with("HTTP/1.") && answer.contains(HTTPD_BODY), "the vfvm pod's httpd, from the host: {answer:?}");
        eprintln!("containerd {}: the vfvm pod reached the gateway, the runc pod, the other vfvm pod and the lab's peer; both reached it; its httpd answered the host", version.name());

        let (_, resolv, _) = cri.exec(&ca, &["cat", "/etc/resolv.conf"])?;
        for line in [format!("nameserver {POD_DNS_SERVER}"), "search vfvm.test".into(), "options ndots:2".into()] {
            ensure!(resolv.lines().any(|l| l.trim() == line), "the container's /etc/resolv.conf should hold {line:?}: {resolv:?}");
        }

        // The host side of pod A: its tap in its netns, joined to eth0.
        let netns_a = cri.pod_netns(&a)?;
        let (taps, qdisc) = taps_in(&netns_a)?;
        ensure!(
            taps == "tap0_vfvm" && qdisc,
            "pod A's netns {} should hold its tap and eth0's ingress qdisc: {taps:?}, {qdisc}",
            netns_a.display()
        );
        let datapath = if c.log().contains("datapath=Some(Vhost)") { "vhost-net" } else { "userspace" };
        eprintln!("containerd {}: resolv.conf holds the pod's DNS config; datapath {datapath}", version.name());

        for pod in [&a, &b, &r] {
            cri.remove_pod(pod)?;
        }
        wait_nothing_left("after stopp and rmp")?;
        if netns_a.exists() {
            let (taps, qdisc) = taps_in(&netns_a)?;
            ensure!(taps.is_empty() && !qdisc, "left in {}: taps {taps:?}, eth0's ingress qdisc {qdisc}", netns_a.display());
        }
        // CNI DEL released the pods' addresses and veths.
        let brif: Vec<_> = std::fs::read_dir(format!("/sys/class/net/{}/brif", vfvm_test_containerd::CNI_BRIDGE))
            .map(|d| d.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        ensure!(brif.is_empty(), "veths left on the bridge after CNI DEL: {brif:?}");
        let left = String::from_utf8_lossy(&Command::new("ip").args(["-o", "link", "show"]).output()?.stdout).into_owned();
        ensure!(!left.contains("_vfvm"), "a tap in the host netns: {left}");

        // A netns holding a bare tun (up): the start fails naming it; nothing left.
        let bad = format!("vfvm-bad-{}", std::process::id());
        let sh = |args: &[&str]| Command::new("ip").args(args).status();
        sh(&["netns", "add", &bad])?;
        sh(&["-n", &bad, "tuntap", "add", "dev", "tun9", "mode", "tun"])?;
        sh(&["-n", &bad, "link", "set", "tun9", "up"])?;
        c.import_test_images()?;
        let ns_arg = format!("network:/run/netns/{bad}");
        let out = c.ctr_within(
            &["run", "--rm", "--runtime", "io.containerd.vfvm.v2", "--with-ns", &ns_arg, oci::BUSYBOX_REF, "bad-net", "true"],
            CALL_LIMIT,
        );
        let tap_left = taps_in(&PathBuf::from("/run/netns").join(&bad));
        let _ = sh(&["netns", "delete", &bad]);
        let out = out?;
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        ensure!(
            !out.status.success() && text.contains("interface \"tun9\"") && text.contains("is a tun link"),
            "a pod whose netns holds a bare tun: {text}"
        );
        ensure!(tap_left?.0.is_empty(), "a tap was left in the bad pod's netns");
        wait_nothing_left("after the refused pod")?;
        eprintln!("containerd {}: a bare tun in the pod's netns refused: {}", version.name(), text.lines().last().unwrap_or_default());
        Ok(())
    });
    drop(peer);
    c.stop().unwrap();
}

#[test]
#[ignore = "needs the lab: run by cargo xtask test"]
fn lab_cri_pod_network_reaches_pods_peer_and_host_containerd_1_6() {
    pod_network(Version::V1_6);
}

#[test]
#[ignore = "needs the lab: run by cargo xtask test"]
fn lab_cri_pod_network_reaches_pods_peer_and_host_containerd_2_1() {
    pod_network(Version::V2_1);
}

/// The pod network benchmark's per-round work: seconds of iperf3 each way.
const SHORT_NET_SECS: u32 = 3;
const FULL_NET_SECS: u32 = 10;
/// Pings per RTT figure.
const NET_PINGS: u32 = 20;

/// One pod's figures: TCP host->pod and pod->host (Gbit/s), ping RTT (ms).
#[derive(Clone, Copy, Debug)]
struct NetFigures {
    to_pod: f64,
    from_pod: f64,
    rtt_ms: f64,
}

const IPERF3_PORT: u16 = 5201;

/// Polls until `ip:port` accepts a TCP connection (a server in a pod is up).
fn wait_listening(ip: &str, port: u16, deadline: Instant) -> Result<()> {
    let addr: std::net::SocketAddr = format!("{ip}:{port}").parse()?;
    loop {
        match std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() >= deadline => bail!("{addr} never accepted a connection: {e}"),
            Err(_) => std::thread::sleep(POLL_INTERVAL),
        }
    }
}

/// iperf3 from this host (L2) to the pod's iperf3 server: Gbit/s received.
fn iperf3_gbits(ip: &str, secs: u32, reverse: bool) -> Result<f64> {
    let mut cmd = Command::new(oci::IPERF3);
    cmd.args(["-c", ip, "-t", &secs.to_string(), "-J", "--connect-timeout", "20000"]);
    if reverse {
        cmd.arg("-R");
    }
    let out = output_within(&mut cmd, Duration::from_secs(u64::from(secs) + 60))?;
    let report: Value =
        serde_json::from_slice(&out.stdout).with_context(|| format!("iperf3 -c {ip}: {}", String::from_utf8_lossy(&out.stderr)))?;
    let bps = report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .with_context(|| format!("iperf3 -c {ip}: no end.sum_received in its report: {}", report["error"]))?;
    Ok(bps / 1e9)
}

/// busybox ping from this host: the average RTT in ms.
fn ping_rtt_ms(ip: &str) -> Result<f64> {
    let out = Command::new("busybox").args(["ping", "-c", &NET_PINGS.to_string(), "-i", "0.2", "-W", "10", ip]).output()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    // "round-trip min/avg/max = 0.123/0.456/0.789 ms"
    let avg = text
        .lines()
        .find_map(|l| l.strip_prefix("round-trip min/avg/max = "))
        .and_then(|v| v.split('/').nth(1))
        .and_then(|v| v.parse().ok());
    avg.with_context(|| format!("ping {ip}: no round-trip line: {text}"))
}

/// Issue #16's benchmark: TCP throughput both ways and ping RTT from the host to a
/// vfvm pod on vhost-net, one on the VMM's own datapath, and a runc pod, each running
/// Debian's iperf3 server; `rounds` rounds in rotated order in one lab run; prints the
/// medians and the ratios against runc.
fn bench_pod_network(rounds: usize, secs: u32) {
    let c = containerd(Version::V2_1);
    scenario("bench-network", &c, |cri| {
        let datapath =
            |word: &str| install_vfvm(&build_dir(), None, |cfg| cfg.replace("datapath = \"auto\"", &format!("datapath = \"{word}\"")));
        let mut pods = Vec::new();
        for (label, handler, path) in
            [("vfvm vhost-net", "kata", Some("vhost")), ("vfvm userspace", "kata", Some("userspace")), ("runc", "runc", None)]
        {
            if let Some(p) = path {
                datapath(p)?;
            }
            let name = format!("bench-net-{}", label.replace(' ', "-"));
            let pod_file = cri.pod_config(&name)?;
            let pod = cri.runp(handler, &pod_file)?;
            let container = json!({
                "metadata": {"name": format!("{name}-c")},
                "image": {"image": oci::IPERF3_REF},
                "args": ["-s"],
                "log_path": format!("{name}.log"),
            });
            let file = cri.file(&format!("container-{name}.json"), &container)?;
            let id = cri.create_and_start(&pod, &file, &pod_file)?;
            cri.wait_running(&id, Instant::now() + CALL_LIMIT)?;
            let ip = cri.pod_ip(&pod)?;
            wait_listening(&ip, IPERF3_PORT, Instant::now() + CALL_LIMIT)?;
            pods.push((label, pod.clone(), ip));
        }
        datapath("auto")?;
        let mut figures: Vec<Vec<NetFigures>> = vec![Vec::new(); pods.len()];
        for round in 0..rounds {
            // Rotated, so a busy phase of the host weighs on each alike.
            for k in 0..pods.len() {
                let i = (round + k) % pods.len();
                let ip = &pods[i].2;
                let f = NetFigures {
                    to_pod: iperf3_gbits(ip, secs, false)?,
                    from_pod: iperf3_gbits(ip, secs, true)?,
                    rtt_ms: ping_rtt_ms(ip)?,
                };
                eprintln!("round {round}: {}: {f:?}", pods[i].0);
                figures[i].push(f);
            }
        }
        let med = |v: Vec<f64>| {
            let mut v = v;
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let summary: Vec<(f64, f64, f64)> = figures
            .iter()
            .map(|f| {
                (
                    med(f.iter().map(|x| x.to_pod).collect()),
                    med(f.iter().map(|x| x.from_pod).collect()),
                    med(f.iter().map(|x| x.rtt_ms).collect()),
                )
            })
            .collect();
        let runc = summary[summary.len() - 1];
        let mut lines = vec![format!(
            "pod network (bridge CNI, host <-> pod), containerd 2.1, medians of {rounds} round(s) of {secs} s iperf3 each way and {NET_PINGS} pings (lab L2 under TCG):"
        )];
        for ((label, _, _), (to, from, rtt)) in pods.iter().zip(&summary) {
            lines.push(format!(
                "  {label}: host->pod {to:.3} Gbit/s ({:.2} of runc), pod->host {from:.3} Gbit/s ({:.2} of runc), RTT {rtt:.3} ms ({:.2}x runc's)",
                to / runc.0.max(1e-9),
                from / runc.1.max(1e-9),
                rtt / runc.2.max(1e-9)
            ));
        }
        print_figures(&lines.join("\n"));
        for (_, pod, _) in &pods {
            cri.remove_pod(pod)?;
        }
        wait_nothing_left("after the network benchmark")
    });
    c.stop().unwrap();
}

/// The benchmark's short version in the test command: one round of
/// [`SHORT_NET_SECS`] seconds each way.
#[test]
#[ignore = "needs the lab: run by cargo xtask test"]
fn lab_cri_bench_pod_network_vfvm_vs_runc() {
    bench_pod_network(1, SHORT_NET_SECS);
}

/// The full benchmark, whose figures the README records.
#[test]
#[ignore = "needs the lab; the full run, by hand: cargo xtask lab test --filter byhand_cri_bench_pod_network (see the README)"]
fn byhand_cri_bench_pod_network_vfvm_vs_runc() {
    bench_pod_network(BENCH_ROUNDS, FULL_NET_SECS);
}
