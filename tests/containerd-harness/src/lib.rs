//! A private containerd for tests: either version the project supports (1.6 from
//! Debian bookworm, 2.1 from Debian sid under [`SID_PREFIX`], both installed by
//! `cargo xtask install`), configured from the project's own snippets in
//! `configs/containerd/` plus private paths, with its root, state and socket on a
//! tmpfs of its own (overlayfs upper dirs cannot live on overlayfs, and L2's `/` is
//! one). It imports the test images of [`oci`] on request, and on drop stops
//! containerd, kills the shims it started and removes everything it created, mounts
//! included.
//!
//! Meant for tests that run inside the lab's L2 machine (root, cgroup v2 mounted by
//! the lab's setup); nothing here assumes a system containerd.

pub mod igb_vfs;
pub mod oci;

use anyhow::{bail, ensure, Context, Result};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Where `cargo xtask install` unpacks Debian sid's containerd 2.1 (`usr/bin/...` below it).
pub const SID_PREFIX: &str = "/opt/vfvm/containerd-2.1";
/// The containerd namespace the harness's `ctr` commands use.
pub const NAMESPACE: &str = "vfvm-test";
/// The namespace CRI keeps its pods, containers and images in.
pub const CRI_NAMESPACE: &str = "k8s.io";
/// The network the harness's CNI config gives CRI pods: a bridge on a subnet of
/// the benchmarking range that the lab does not use (its peer link is 198.18.0.0/24).
pub const CNI_BRIDGE: &str = "vfvmtest0";
pub const CNI_SUBNET: &str = "198.19.0.0/24";
/// Where Debian's containernetworking-plugins puts the CNI plugins.
pub const CNI_BIN_DIR: &str = "/usr/lib/cni";
/// How long containerd gets to answer on its socket after it starts (TCG is slow).
const START_DEADLINE: Duration = Duration::from_secs(120);
/// How long containerd and its shims get to exit after SIGTERM / SIGKILL.
const STOP_DEADLINE: Duration = Duration::from_secs(30);

/// A containerd release line and where its binaries are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// Debian bookworm's containerd 1.6, at `/usr/bin`; config `version = 2`.
    V1_6,
    /// Debian sid's containerd 2.1, under [`SID_PREFIX`]; config `version = 3`.
    V2_1,
}

impl Version {
    pub const ALL: [Version; 2] = [Version::V1_6, Version::V2_1];

    /// "1.6" or "2.1".
    pub fn name(self) -> &'static str {
        match self {
            Version::V1_6 => "1.6",
            Version::V2_1 => "2.1",
        }
    }

    /// The directory holding this version's `containerd`, `ctr` and
    /// `containerd-shim-runc-v2`.
    pub fn bin_dir(self) -> PathBuf {
        match self {
            Version::V1_6 => PathBuf::from("/usr/bin"),
            Version::V2_1 => Path::new(SID_PREFIX).join("usr/bin"),
        }
    }

    pub fn containerd(self) -> PathBuf {
        self.bin_dir().join("containerd")
    }

    pub fn ctr(self) -> PathBuf {
        self.bin_dir().join("ctr")
    }

    /// The project's config snippet for this version: the source of truth for how
    /// vfvm is registered with containerd.
    pub fn config_snippet(self) -> &'static str {
        match self {
            Version::V1_6 => include_str!("../../../configs/containerd/config-v2.toml"),
            Version::V2_1 => include_str!("../../../configs/containerd/config-v3.toml"),
        }
    }

    /// The CRI plugin holding the runtimes the project's snippet configures.
    pub fn cri_runtime_plugin(self) -> &'static str {
        match self {
            Version::V1_6 => "io.containerd.grpc.v1.cri",
            Version::V2_1 => "io.containerd.cri.v1.runtime",
        }
    }

    /// Whether `containerd --version` output belongs to this release line, e.g.
    /// `containerd github.com/containerd/containerd/v2 2.1.9+unknown`.
    pub fn matches(self, version_output: &str) -> bool {
        let prefix = format!("{}.", self.name());
        version_output.split_whitespace().nth(2).is_some_and(|v| v.starts_with(&prefix))
    }

    /// Checks the installed binary is there and of this release line.
    pub fn check_installed(self) -> Result<String> {
        let bin = self.containerd();
        let out = Command::new(&bin).arg("--version").stdin(Stdio::null()).output().with_context(|| {
            format!("running {} --version: is containerd {} installed? (`cargo xtask install`)", bin.display(), self.name())
        })?;
        let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
        ensure!(out.status.success() && self.matches(&text), "{} is not containerd {}: `{text}`", bin.display(), self.name());
        Ok(text)
    }
}

/// A running private containerd. Dropping it tears everything down; [`Containerd::stop`]
/// does the same and reports what went wrong.
/// A second CNI network attached to every CRI pod after the bridge (CRI's
/// `max_conf_num`), as Multus attaches an SR-IOV network in a cluster: one VF by PCI
/// address, through the test plugin `vfvm-test-sriov-cni` (its binary at `plugin`),
/// with static IPAM. CRI names its interface `eth1`.
#[derive(Clone, Debug)]
pub struct SriovNetwork {
    pub plugin: PathBuf,
    pub device_id: String,
    pub mac: String,
    pub mtu: u32,
    /// `addr/prefix`.
    pub address: String,
    /// (destination CIDR, gateway).
    pub routes: Vec<(String, String)>,
}

pub struct Containerd {
    version: Version,
    dir: PathBuf,
    sriov: Option<SriovNetwork>,
    child: Option<Child>,
    stopped: bool,
    /// Whether /run/containerd existed before we started: shims and ctr put their
    /// sockets and FIFOs under it whatever the config says.
    had_run_dir: bool,
}

/// The fixed directory containerd's shims and ctr use for sockets and FIFOs.
const RUN_DIR: &str = "/run/containerd";

static INSTANCE: AtomicU32 = AtomicU32::new(0);
/// Numbers the output files of [`Containerd::ctr_within`].
static CTR_RUNS: AtomicU32 = AtomicU32::new(0);

impl Containerd {
    /// Mounts a tmpfs for a new instance, writes its config, starts containerd and
    /// waits until it answers `ctr version`.
    pub fn start(version: Version) -> Result<Containerd> {
        Self::start_with(version, None)
    }

    /// [`Containerd::start`] with `sriov` as every CRI pod's second network.
    pub fn start_with_sriov(version: Version, sriov: SriovNetwork) -> Result<Containerd> {
        Self::start_with(version, Some(sriov))
    }

    fn start_with(version: Version, sriov: Option<SriovNetwork>) -> Result<Containerd> {
        version.check_installed()?;
        ensure!(
            mount_type("/sys/fs/cgroup").as_deref() == Some("cgroup2"),
            "/sys/fs/cgroup is not a cgroup v2 mount: runc needs one (the lab's setup mounts it)"
        );
        let dir = std::env::temp_dir().join(format!("vfvm-containerd-{}-{}", std::process::id(), INSTANCE.fetch_add(1, Ordering::Relaxed)));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let had_run_dir = Path::new(RUN_DIR).exists();
        let mut me = Containerd { version, dir, sriov, child: None, stopped: false, had_run_dir };
        run(Command::new("mount").args(["-t", "tmpfs", "-o", "mode=0700", "vfvm-containerd"]).arg(&me.dir))?;
        let config = me.dir.join("config.toml");
        std::fs::write(&config, me.config()).with_context(|| format!("writing {}", config.display()))?;
        me.write_cni_config()?;
        let log = std::fs::File::create(me.log_path()).with_context(|| format!("creating {}", me.log_path().display()))?;
        let mut cmd = Command::new(version.containerd());
        cmd.arg("--config")
            .arg(&config)
            // This version's own shim first: containerd looks shims up on PATH.
            .env("PATH", path_with(&version.bin_dir()))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        // SAFETY: prctl in the child between fork and exec; async-signal-safe.
        // A test that dies without dropping us must not leave containerd behind.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let started = Instant::now();
        me.child = Some(cmd.spawn().with_context(|| format!("starting {}", version.containerd().display()))?);
        me.wait_until_answering(started + START_DEADLINE)?;
        eprintln!("containerd {}: answering on {} after {:.1}s", version.name(), me.socket().display(), started.elapsed().as_secs_f64());
        Ok(me)
    }

    /// The generated config: private paths first (top-level keys must precede the
    /// snippet's tables), then the project's snippet unchanged, then private tables.
    fn config(&self) -> String {
        let q = |p: PathBuf| format!("\"{}\"", p.display());
        let mut text = format!(
            "# vfvm-test-containerd: private paths for a test instance\nroot = {}\nstate = {}\n\n",
            q(self.root()),
            q(self.state())
        );
        text.push_str(self.version.config_snippet());
        text.push_str(&format!(
            "\n# vfvm-test-containerd: private sockets and directories\n[grpc]\n  address = {}\n[ttrpc]\n  address = {}\n\
             [plugins.\"io.containerd.internal.v1.opt\"]\n  path = {}\n",
            q(self.socket()),
            q(self.dir.join("containerd.sock.ttrpc")),
            q(self.dir.join("opt")),
        ));
        if self.version == Version::V2_1 {
            // 2.x starts NRI by default, with its socket under /var/run.
            text.push_str(&format!("[plugins.\"io.containerd.nri.v1.nri\"]\n  socket_path = {}\n", q(self.dir.join("nri.sock"))));
        }
        // CRI: the test pause image as the sandbox image (never pulled: imported by
        // `import_test_images_into(CRI_NAMESPACE)`), pod network namespaces under our
        // state directory, and CNI from private config and IPAM directories.
        // With a second network, the plugins come from a private directory that adds
        // the test plugin to Debian's (1.6 takes one directory).
        let bin_dir = if self.sriov.is_some() { self.cni_bin_dir().display().to_string() } else { CNI_BIN_DIR.to_string() };
        let max_conf = if self.sriov.is_some() { "  max_conf_num = 2\n" } else { "" };
        let (sandbox_image, cni) = match self.version {
            Version::V1_6 => (
                format!("[plugins.\"io.containerd.grpc.v1.cri\"]\n  sandbox_image = \"{}\"\n  netns_mounts_under_state_dir = true\n", oci::PAUSE_REF),
                format!("[plugins.\"io.containerd.grpc.v1.cri\".cni]\n  bin_dir = \"{bin_dir}\"\n  conf_dir = {}\n{max_conf}", q(self.cni_conf_dir())),
            ),
            Version::V2_1 => (
                format!(
                    "[plugins.\"io.containerd.cri.v1.images\".pinned_images]\n  sandbox = \"{}\"\n[plugins.\"io.containerd.cri.v1.runtime\"]\n  netns_mounts_under_state_dir = true\n",
                    oci::PAUSE_REF
                ),
                format!("[plugins.\"io.containerd.cri.v1.runtime\".cni]\n  bin_dirs = [\"{bin_dir}\"]\n  conf_dir = {}\n{max_conf}", q(self.cni_conf_dir())),
            ),
        };
        text.push_str("# vfvm-test-containerd: CRI\n");
        text.push_str(&sandbox_image);
        text.push_str(&cni);
        text
    }

    fn cni_conf_dir(&self) -> PathBuf {
        self.dir.join("cni/net.d")
    }

    fn cni_bin_dir(&self) -> PathBuf {
        self.dir.join("cni/bin")
    }

    /// Where the SR-IOV test plugin caches its attachments (as sriov-cni's
    /// `/var/lib/cni/sriov`) and logs its calls (`calls.log`).
    pub fn sriov_cache_dir(&self) -> PathBuf {
        self.dir.join("cni/sriov")
    }

    /// The SR-IOV test plugin's log of its ADD and DEL calls.
    pub fn sriov_calls(&self) -> String {
        std::fs::read_to_string(self.sriov_cache_dir().join("calls.log")).unwrap_or_default()
    }

    /// The second network's config: the test SR-IOV plugin with static IPAM.
    fn sriov_config(&self, n: &SriovNetwork) -> String {
        let routes: Vec<String> = n.routes.iter().map(|(dst, gw)| format!(r#"{{"dst": "{dst}", "gw": "{gw}"}}"#)).collect();
        format!(
            r#"{{"cniVersion": "0.4.0", "name": "vfvm-sriov", "plugins": [{{"type": "vfvm-test-sriov-cni", "deviceID": "{}", "mac": "{}", "mtu": {}, "cacheDir": "{}", "ipam": {{"type": "static", "addresses": [{{"address": "{}"}}], "routes": [{}]}}}}]}}"#,
            n.device_id,
            n.mac,
            n.mtu,
            self.sriov_cache_dir().display(),
            n.address,
            routes.join(", ")
        )
    }

    /// The pod network: a bridge with host-local IPAM (a default route via the
    /// bridge), its state on our tmpfs.
    /// (CRI adds the loopback interface itself, with the `loopback` plugin.)
    fn cni_config(&self) -> String {
        let ipam_dir = self.dir.join("cni/ipam");
        format!(
            r#"{{"cniVersion": "0.4.0", "name": "vfvm-test", "plugins": [{{"type": "bridge", "bridge": "{CNI_BRIDGE}", "isGateway": true, "ipMasq": false, "ipam": {{"type": "host-local", "ranges": [[{{"subnet": "{CNI_SUBNET}"}}]], "routes": [{{"dst": "0.0.0.0/0"}}], "dataDir": "{}"}}}}]}}"#,
            ipam_dir.display()
        )
    }

    fn write_cni_config(&self) -> Result<()> {
        let dir = self.cni_conf_dir();
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let file = dir.join("10-vfvm-test.conflist");
        std::fs::write(&file, self.cni_config()).with_context(|| format!("writing {}", file.display()))?;
        if let Some(n) = &self.sriov {
            let file = dir.join("20-vfvm-sriov.conflist");
            std::fs::write(&file, self.sriov_config(n)).with_context(|| format!("writing {}", file.display()))?;
            let bin = self.cni_bin_dir();
            std::fs::create_dir_all(&bin).with_context(|| format!("creating {}", bin.display()))?;
            for entry in std::fs::read_dir(CNI_BIN_DIR).with_context(|| format!("reading {CNI_BIN_DIR}"))?.filter_map(Result::ok) {
                std::os::unix::fs::symlink(entry.path(), bin.join(entry.file_name()))?;
            }
            ensure!(n.plugin.is_file(), "the SR-IOV test plugin {} is not built", n.plugin.display());
            std::os::unix::fs::symlink(&n.plugin, bin.join("vfvm-test-sriov-cni"))?;
        }
        // The bridge and veth drivers, and what the shim joins a pod's veth to its
        // VM with (taps, vhost-net, tc ingress redirects), loaded here: in L2 the
        // kernel's own module loading does not see the modules of the root the lab
        // chroots into.
        for module in ["bridge", "veth", "tun", "vhost_net", "sch_ingress", "cls_u32", "act_mirred"] {
            if !Path::new("/sys/module").join(module).exists() {
                if let Err(e) = run(Command::new("modprobe").arg(module)) {
                    eprintln!("containerd {}: CRI pods may get no network: {e:#}", self.version.name());
                }
            }
        }
        Ok(())
    }

    /// The CRI endpoint (containerd serves CRI on its main socket), as crictl's
    /// `--runtime-endpoint` takes it.
    pub fn cri_endpoint(&self) -> String {
        format!("unix://{}", self.socket().display())
    }

    /// containerd's process id (for fd-leak checks).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    pub fn version(&self) -> Version {
        self.version
    }

    /// The instance's tmpfs: everything it creates lives below.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn root(&self) -> PathBuf {
        self.dir.join("root")
    }

    pub fn state(&self) -> PathBuf {
        self.dir.join("state")
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join("containerd.sock")
    }

    /// A private runc root for `ctr run --runc-root`, so runc's state stays on our tmpfs.
    pub fn runc_root(&self) -> PathBuf {
        self.dir.join("runc")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("containerd.log")
    }

    /// containerd's output so far, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_else(|e| format!("(no log: {e})"))
    }

    /// `ctr` of this version, on this instance's socket and namespace.
    pub fn ctr(&self) -> Command {
        self.ctr_in(NAMESPACE)
    }

    /// `ctr` of this version, on this instance's socket, in `namespace`.
    pub fn ctr_in(&self, namespace: &str) -> Command {
        let mut cmd = Command::new(self.version.ctr());
        cmd.arg("--address").arg(self.socket()).args(["--namespace", namespace]).stdin(Stdio::null());
        cmd
    }

    /// Runs `ctr ARGS` and returns its output, whatever its exit status.
    pub fn ctr_output(&self, args: &[&str]) -> Result<Output> {
        self.ctr().args(args).output().with_context(|| format!("running ctr {}", args.join(" ")))
    }

    /// Runs `ctr ARGS` like [`Containerd::ctr_output`], but kills it after `limit` and
    /// fails with what it printed so far and containerd's log: a hung runtime fails
    /// the test that found it instead of the whole lab run.
    pub fn ctr_within(&self, args: &[&str], limit: Duration) -> Result<Output> {
        let n = CTR_RUNS.fetch_add(1, Ordering::Relaxed);
        let (out_path, err_path) = (self.dir.join(format!("ctr-{n}.out")), self.dir.join(format!("ctr-{n}.err")));
        let mut child = self
            .ctr()
            .args(args)
            .stdout(std::fs::File::create(&out_path)?)
            .stderr(std::fs::File::create(&err_path)?)
            .spawn()
            .with_context(|| format!("starting ctr {}", args.join(" ")))?;
        let finished = wait_exit(pid_t_of(child.id()), limit)?;
        if !finished {
            let _ = child.kill();
        }
        let status = child.wait().context("reaping ctr")?;
        let (stdout, stderr) = (std::fs::read(&out_path).unwrap_or_default(), std::fs::read(&err_path).unwrap_or_default());
        let _ = (std::fs::remove_file(&out_path), std::fs::remove_file(&err_path));
        ensure!(
            finished,
            "ctr {} (containerd {}) still running after {}s; it printed:\n{}{}\ncontainerd's log:\n{}",
            args.join(" "),
            self.version.name(),
            limit.as_secs(),
            String::from_utf8_lossy(&stdout),
            String::from_utf8_lossy(&stderr),
            self.log()
        );
        Ok(Output { status, stdout, stderr })
    }

    /// Runs `ctr ARGS`, failing with its stderr on a non-zero exit; returns its stdout.
    pub fn ctr_ok(&self, args: &[&str]) -> Result<String> {
        self.ctr_ok_in(NAMESPACE, args)
    }

    /// [`Containerd::ctr_ok`] in another namespace (e.g. [`CRI_NAMESPACE`]).
    pub fn ctr_ok_in(&self, namespace: &str, args: &[&str]) -> Result<String> {
        let out = self.ctr_in(namespace).args(args).output().with_context(|| format!("running ctr -n {namespace} {}", args.join(" ")))?;
        ensure!(
            out.status.success(),
            "ctr -n {namespace} {} (containerd {}) failed ({}): {}{}",
            args.join(" "),
            self.version.name(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn wait_until_answering(&mut self, deadline: Instant) -> Result<()> {
        loop {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                bail!("containerd {} exited ({status}) before answering; its log:\n{}", self.version.name(), self.log());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!(
                    "containerd {} did not answer on {} within {}s; its log:\n{}",
                    self.version.name(),
                    self.socket().display(),
                    START_DEADLINE.as_secs(),
                    self.log()
                );
            }
            // ctr blocks while it dials, up to the connect timeout: no sleeping here.
            let timeout = format!("--connect-timeout={}s", left.as_secs().clamp(1, 5));
            let out = self.ctr().arg(&timeout).arg("version").stdout(Stdio::piped()).stderr(Stdio::piped()).output()?;
            if out.status.success() {
                return Ok(());
            }
            // No socket yet: ctr 2.x fails at once instead of dialing; wait for the
            // socket to appear, a second at a time, to notice containerd exiting.
            if !self.socket().exists() {
                wait_for_path(&self.socket(), Duration::from_secs(1));
            }
        }
    }

    /// Builds the test images (from the static busybox, see [`oci`]) into this
    /// instance's tmpfs and imports them; returns them with the import's duration.
    pub fn import_test_images(&self) -> Result<(Vec<oci::ImageArchive>, Duration)> {
        self.import_test_images_into(NAMESPACE)
    }

    /// [`Containerd::import_test_images`] into `namespace`: [`CRI_NAMESPACE`] makes
    /// them CRI's images, the pause image its sandbox image.
    pub fn import_test_images_into(&self, namespace: &str) -> Result<(Vec<oci::ImageArchive>, Duration)> {
        let busybox = static_busybox()?;
        let started = Instant::now();
        let images = oci::build_test_images(&busybox, &self.dir.join("images"))?;
        eprintln!("containerd {}: built the test images in {:.2}s", self.version.name(), started.elapsed().as_secs_f64());
        let started = Instant::now();
        for image in &images {
            let path = image.path.to_string_lossy().into_owned();
            self.ctr_ok_in(namespace, &["images", "import", &path])
                .with_context(|| format!("importing {} from {path} into namespace {namespace}", image.reference))?;
        }
        let took = started.elapsed();
        let listed = self.ctr_ok_in(namespace, &["images", "ls", "-q"])?;
        for image in &images {
            ensure!(listed.lines().any(|l| l.trim() == image.reference), "{} missing after import; images: {listed}", image.reference);
        }
        Ok((images, took))
    }

    /// A plugin's status as `ctr plugins ls` reports it (`ok`, `error`, `skip`);
    /// `plugin` is its full name, e.g. `io.containerd.grpc.v1.cri`.
    pub fn plugin_status(&self, plugin: &str) -> Result<String> {
        let listing = self.ctr_ok(&["plugins", "ls"])?;
        listing
            .lines()
            .find_map(|l| {
                let cols: Vec<&str> = l.split_whitespace().collect();
                let (kind, id, status) = (cols.first()?, cols.get(1)?, cols.last()?);
                (format!("{kind}.{id}") == plugin).then(|| status.to_string())
            })
            .with_context(|| format!("containerd {} has no plugin {plugin}:\n{listing}", self.version.name()))
    }

    /// Subscribes to containerd's events (`ctr events`), returning once the
    /// subscription is known to be live, so no event of a later command is missed.
    pub fn events(&self) -> Result<Events> {
        let mut child = self.ctr().arg("events").stdout(Stdio::piped()).stderr(Stdio::null()).spawn().context("starting ctr events")?;
        let stdout = child.stdout.take().context("ctr events has no stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)).map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut events = Events { child, lines: rx };
        // A namespace update is a harmless event of our own: once ctr events prints
        // one, it is subscribed. Repeated, since one sent before it subscribed is lost.
        let deadline = Instant::now() + START_DEADLINE;
        for n in 0.. {
            self.ctr_ok(&["namespaces", "label", NAMESPACE, &format!("vfvm.test.sync={n}")])?;
            let attempt = (Instant::now() + Duration::from_secs(3)).min(deadline);
            if events.wait_for("/namespaces/update", NAMESPACE, attempt).is_ok() {
                break;
            }
            ensure!(Instant::now() < deadline, "ctr events showed no event within {}s", START_DEADLINE.as_secs());
        }
        self.ctr_ok(&["namespaces", "label", NAMESPACE, "vfvm.test.sync="])?;
        Ok(events)
    }

    /// PIDs of processes started for this instance (its shims): their command lines
    /// name its socket or its directory.
    pub fn shim_pids(&self) -> Vec<i32> {
        let needle = self.dir.to_string_lossy().into_owned();
        let mine = self.child.as_ref().map(|c| pid_t_of(c.id()));
        let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
        entries
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
            .filter(|pid| Some(*pid) != mine)
            .filter(|pid| {
                std::fs::read(format!("/proc/{pid}/cmdline"))
                    .map(|c| String::from_utf8_lossy(&c).replace('\0', " ").contains(&needle))
                    .unwrap_or(false)
            })
            .collect()
    }

    /// Mount points at or below this instance's directory (its tmpfs included).
    pub fn mounts(&self) -> Vec<PathBuf> {
        mounts_under(&self.dir)
    }

    /// Tears everything down: containers and tasks, containerd, leftover shims,
    /// mounts, the directory, the namespace's cgroup. Reports the first failure after
    /// trying every step.
    pub fn stop(mut self) -> Result<()> {
        self.teardown()
    }

    fn teardown(&mut self) -> Result<()> {
        if self.stopped {
            return Ok(());
        }
        self.stopped = true;
        let mut errors = Vec::new();
        if self.child.is_some() {
            // CRI's pods too: a failed test may leave them (their VMs, for vfvm).
            for namespace in [NAMESPACE, CRI_NAMESPACE] {
                if let Err(e) = self.remove_containers(namespace) {
                    errors.push(format!("removing containers of namespace {namespace}: {e:#}"));
                }
            }
        }
        if let Some(child) = self.child.take() {
            if let Err(e) = stop_process(child, STOP_DEADLINE) {
                errors.push(format!("stopping containerd: {e:#}"));
            }
        }
        for pid in self.shim_pids() {
            if let Err(e) = kill_and_wait(pid, libc::SIGKILL, STOP_DEADLINE) {
                errors.push(format!("killing leftover shim {pid}: {e:#}"));
            }
        }
        // Deepest first: snapshot mounts and rootfs mounts sit on our tmpfs.
        let mut mounts = self.mounts();
        mounts.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
        for m in &mounts {
            if let Err(e) = run(Command::new("umount").arg(m)) {
                errors.push(format!("{e:#}"));
            }
        }
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            errors.push(format!("removing {}: {e}", self.dir.display()));
        }
        // runc makes /sys/fs/cgroup/<namespace>/<id>; the container's part goes with
        // the container, the namespace's is ours to remove (fails harmlessly if busy).
        let _ = std::fs::remove_dir(Path::new("/sys/fs/cgroup").join(NAMESPACE));
        let _ = std::fs::remove_dir(Path::new("/sys/fs/cgroup").join(CRI_NAMESPACE));
        // The pods' veths went with their network namespaces; the bridge is ours.
        if Path::new("/sys/class/net").join(CNI_BRIDGE).exists() {
            if let Err(e) = run(Command::new("ip").args(["link", "delete", CNI_BRIDGE])) {
                errors.push(format!("{e:#}"));
            }
        }
        if !self.had_run_dir {
            // Empty directories only: remove_dir leaves anything with content alone.
            for sub in ["s", "fifo", "runc", ""] {
                let _ = std::fs::remove_dir(Path::new(RUN_DIR).join(sub));
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            bail!("tearing down containerd {} at {}: {}", self.version.name(), self.dir.display(), errors.join("; "))
        }
    }

    /// Kills every task and deletes every container of `namespace`.
    fn remove_containers(&self, namespace: &str) -> Result<()> {
        for task in self.ctr_ok_in(namespace, &["tasks", "ls", "-q"])?.lines().map(str::trim).filter(|t| !t.is_empty()) {
            // `delete -f` kills the task with SIGKILL and waits for it.
            self.ctr_ok_in(namespace, &["tasks", "delete", "-f", task])?;
        }
        for container in self.ctr_ok_in(namespace, &["containers", "ls", "-q"])?.lines().map(str::trim).filter(|c| !c.is_empty()) {
            self.ctr_ok_in(namespace, &["containers", "rm", container])?;
        }
        Ok(())
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            eprintln!("vfvm-test-containerd: {e:#}");
        }
    }
}

/// A live `ctr events` subscription (see [`Containerd::events`]).
pub struct Events {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Events {
    /// Waits for an event line on `topic` (e.g. `/tasks/exit`) that mentions `id`
    /// (quoted, as in the event's JSON), returning the line. Lines before it are dropped.
    pub fn wait_for(&mut self, topic: &str, id: &str, deadline: Instant) -> Result<String> {
        let quoted = format!("\"{id}\"");
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.split_whitespace().any(|w| w == topic) && line.contains(&quoted) => return Ok(line),
                Ok(_) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => bail!("no {topic} event for {id} before the deadline"),
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => bail!("ctr events ended before a {topic} event for {id}"),
            }
        }
    }
}

impl Drop for Events {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `cmd` (stdin from /dev/null) and returns its output, whatever its exit
/// status; kills it after `limit` and fails with what it printed so far, so a hung
/// runtime fails the test that found it instead of the whole lab run.
pub fn output_within(cmd: &mut Command, limit: Duration) -> Result<Output> {
    use std::io::Read;
    let mut child =
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().with_context(|| format!("starting {cmd:?}"))?;
    fn drain(pipe: Option<impl Read + Send + 'static>) -> std::thread::JoinHandle<Vec<u8>> {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut buf);
            }
            buf
        })
    }
    let (out, err) = (drain(child.stdout.take()), drain(child.stderr.take()));
    let finished = wait_exit(pid_t_of(child.id()), limit)?;
    if !finished {
        let _ = child.kill();
    }
    let status = child.wait().with_context(|| format!("reaping {cmd:?}"))?;
    let (stdout, stderr) = (out.join().unwrap_or_default(), err.join().unwrap_or_default());
    ensure!(
        finished,
        "{cmd:?} still running after {}s; it printed:\n{}{}",
        limit.as_secs(),
        String::from_utf8_lossy(&stdout),
        String::from_utf8_lossy(&stderr)
    );
    Ok(Output { status, stdout, stderr })
}

/// Where the installed runtime config lives (L2's /etc is a throwaway overlay).
pub const VFVM_CONFIG: &str = "/etc/vfvm/vfvm.toml";

/// Installs vfvm as containerd's `io.containerd.vfvm.v2` runtime for a lab test:
/// writes [`VFVM_CONFIG`] from the shipped `configs/vfvm.toml` with this build's
/// paths (`build_dir` holds `vfvm-vmm` and `containerd-shim-vfvm-v2`), the guest
/// image `cargo xtask test` built (`VFVM_TEST_AGENT_KERNEL`/`_INITRD`, the kernel
/// replaceable by `kernel_override`) and `virtiofsd`, and puts the shim on
/// containerd's PATH. `edit` may change the config text further.
pub fn install_vfvm(build_dir: &Path, kernel_override: Option<&str>, edit: impl FnOnce(String) -> String) -> Result<()> {
    let kernel = match kernel_override {
        Some(k) => k.to_string(),
        None => std::env::var("VFVM_TEST_AGENT_KERNEL").context("VFVM_TEST_AGENT_KERNEL: cargo xtask test sets it")?,
    };
    let initrd = std::env::var("VFVM_TEST_AGENT_INITRD")
        .context("VFVM_TEST_AGENT_INITRD: cargo xtask test builds the guest image with the agent")?;
    let virtiofsd = which("virtiofsd").context("virtiofsd is not installed (cargo xtask install puts it in place)")?;
    let shipped = include_str!("../../../configs/vfvm.toml");
    let config = shipped
        .replace("path = \"/usr/local/bin/vfvm-vmm\"", &format!("path = \"{}\"", build_dir.join("vfvm-vmm").display()))
        .replace("kernel = \"/usr/share/vfvm/vmlinux\"", &format!("kernel = \"{kernel}\""))
        .replace("initrd = \"/usr/share/vfvm/initrd.img\"", &format!("initrd = \"{initrd}\""))
        .replace("virtiofsd = \"/usr/local/bin/virtiofsd\"", &format!("virtiofsd = \"{}\"", virtiofsd.display()))
        // The agent answers in a few seconds on real KVM; L3 under emulated SVM is slow.
        .replace("dial_timeout_secs = 30", "dial_timeout_secs = 120");
    std::fs::create_dir_all("/etc/vfvm")?;
    std::fs::write(VFVM_CONFIG, edit(config)).with_context(|| format!("writing {VFVM_CONFIG}"))?;
    let shim = build_dir.join("containerd-shim-vfvm-v2");
    ensure!(shim.is_file(), "{} is not built", shim.display());
    let link = Path::new("/usr/local/bin/containerd-shim-vfvm-v2");
    let _ = std::fs::remove_file(link);
    std::os::unix::fs::symlink(&shim, link).with_context(|| format!("linking {}", link.display()))?;
    Ok(())
}

/// The shim's state directory (`[runtime] state_dir` in the shipped config).
pub const VFVM_STATE_DIR: &str = "/run/vfvm";

/// What vfvm pods left behind, described: vfvm-vmm, virtiofsd or shim processes,
/// mounts under [`VFVM_STATE_DIR`], entries in it (other than its VF locks). Empty
/// once every pod is gone.
pub fn vfvm_leftovers() -> Vec<String> {
    let mut left = Vec::new();
    for name in ["vfvm-vmm", "virtiofsd", "containerd-shim-vfvm-v2"] {
        let pids = pids_named(name);
        if !pids.is_empty() {
            left.push(format!("{name} running: {pids:?}"));
        }
    }
    left.extend(mounts_under(Path::new(VFVM_STATE_DIR)).into_iter().map(|m| format!("mount {}", m.display())));
    if let Ok(dir) = std::fs::read_dir(VFVM_STATE_DIR) {
        left.extend(
            dir.filter_map(|e| e.ok())
                .map(|e| e.file_name())
                .filter(|n| n != "vf-locks")
                .map(|n| format!("state {VFVM_STATE_DIR}/{}", n.to_string_lossy())),
        );
    }
    left
}

/// The last 30 lines of every vfvm pod's VM console (`<state>/<pod>/console.log`),
/// for failure messages.
pub fn vfvm_consoles() -> String {
    let Ok(dirs) = std::fs::read_dir(VFVM_STATE_DIR) else { return String::from("(no state dir)") };
    let mut all = String::new();
    for d in dirs.filter_map(|e| e.ok()) {
        if let Ok(text) = std::fs::read_to_string(d.path().join("console.log")) {
            let lines: Vec<&str> = text.lines().collect();
            all += &format!("== {} ==\n{}\n", d.path().display(), lines[lines.len().saturating_sub(30)..].join("\n"));
        }
    }
    all
}

/// Prints a benchmark's figures where they are seen even when its test passes:
/// libtest captures a passing test's `print!` output, but not writes to the
/// process's standard output itself.
pub fn print_figures(text: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes());
    let _ = out.write_all(b"\n");
    let _ = out.flush();
}

/// A program on PATH, or in cargo's bin directory (where `cargo install` puts it).
pub fn which(name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect()).unwrap_or_default();
    dirs.extend(std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo/bin")));
    dirs.push(PathBuf::from("/root/.cargo/bin"));
    dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file())
}

/// PIDs of processes whose executable's file name is `name` (any instance's).
pub fn pids_named(name: &str) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .ok()
                .and_then(|c| c.split(|b| *b == 0).next().map(|argv0| argv0.rsplit(|b| *b == b'/').next() == Some(name.as_bytes())))
                .unwrap_or(false)
        })
        .collect()
}

/// The static busybox the lab installs (busybox-static); the test images need one
/// that runs without a dynamic loader.
pub fn static_busybox() -> Result<PathBuf> {
    for path in ["/bin/busybox", "/usr/bin/busybox"].map(PathBuf::from) {
        if let Ok(bytes) = std::fs::read(&path) {
            if is_static_elf(&bytes) {
                return Ok(path);
            }
        }
    }
    bail!("no static busybox at /bin/busybox or /usr/bin/busybox: install busybox-static (`cargo xtask install`)")
}

/// A 64-bit little-endian ELF without a `PT_INTERP` program header.
fn is_static_elf(bytes: &[u8]) -> bool {
    let field = |at: usize, len: usize| bytes.get(at..at + len).map(|r| r.iter().rev().fold(0usize, |acc, b| (acc << 8) | usize::from(*b)));
    if bytes.get(0..6) != Some(&[0x7f, b'E', b'L', b'F', 2, 1][..]) {
        return false;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (field(0x20, 8), field(0x36, 2), field(0x38, 2)) else { return false };
    const PT_INTERP: usize = 3;
    (0..phnum).all(|i| field(phoff + i * phentsize, 4).is_some_and(|t| t != PT_INTERP))
}

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.stdin(Stdio::null()).output().with_context(|| format!("could not start {cmd:?}"))?;
    ensure!(out.status.success(), "{cmd:?} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn path_with(first: &Path) -> String {
    let rest = std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    format!("{}:{rest}", first.display())
}

/// Mount points from /proc/self/mountinfo (field 5, octal escapes decoded).
fn mount_points() -> Vec<(PathBuf, String)> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let point = unescape_mount(fields.get(4)?);
            // The filesystem type follows the " - " separator.
            let sep = fields.iter().position(|f| *f == "-")?;
            Some((PathBuf::from(point), fields.get(sep + 1)?.to_string()))
        })
        .collect()
}

fn unescape_mount(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() && bytes[i + 1..i + 4].iter().all(|b| (b'0'..=b'7').contains(b)) {
            out.push((bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The type of the filesystem mounted exactly at `path` (the topmost one), if any.
pub fn mount_type(path: &str) -> Option<String> {
    mount_points().into_iter().rev().find(|(p, _)| p == Path::new(path)).map(|(_, t)| t)
}

/// Mount points at or below `dir`.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = mount_points().into_iter().map(|(p, _)| p).filter(|p| p.starts_with(dir)).collect();
    found.dedup();
    found
}

/// Waits until `path` exists or `max` passes, on inotify events for its directory.
fn wait_for_path(path: &Path, max: Duration) {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::os::unix::ffi::OsStrExt;
    let Some(parent) = path.parent() else { return };
    // SAFETY: inotify_init1 returns a new descriptor or -1.
    let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC | libc::IN_NONBLOCK) };
    if fd < 0 {
        return;
    }
    // SAFETY: a descriptor we just got and own alone.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let Ok(dir) = std::ffi::CString::new(parent.as_os_str().as_bytes()) else { return };
    // SAFETY: a valid descriptor and a NUL-terminated path.
    if unsafe { libc::inotify_add_watch(fd.as_raw_fd(), dir.as_ptr(), libc::IN_CREATE | libc::IN_MOVED_TO) } < 0 {
        return;
    }
    let deadline = Instant::now() + max;
    let mut buf = [0u8; 4096];
    // Checked after the watch is in place, so a creation in between is not missed.
    while !path.exists() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || !poll_readable(&fd, left).unwrap_or(false) {
            return;
        }
        // SAFETY: reading into a buffer we own; the events themselves do not matter.
        unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    }
}

/// SIGTERM, then SIGKILL after `deadline`; reaps the child either way.
fn stop_process(mut child: Child, deadline: Duration) -> Result<()> {
    let pid = pid_t_of(child.id());
    // SAFETY: signalling our own child, which we have not reaped yet.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    if !wait_exit(pid, deadline)? {
        // SAFETY: as above.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    let status = child.wait().context("reaping containerd")?;
    // SIGTERM is containerd's normal stop; it exits 0 after it.
    ensure!(status.success() || status.code().is_none(), "containerd exited with {status}");
    Ok(())
}

/// Sends `signal` to `pid` and waits until it has exited.
fn kill_and_wait(pid: i32, signal: i32, deadline: Duration) -> Result<()> {
    let pidfd = pidfd_open(pid)?;
    // SAFETY: plain kill(2).
    unsafe { libc::kill(pid, signal) };
    ensure!(poll_readable(&pidfd, deadline)?, "process {pid} still alive {}s after signal {signal}", deadline.as_secs());
    Ok(())
}

/// A process id as `std::process` gives it (`u32`) in the kernel's `pid_t`.
pub fn pid_t_of(pid: u32) -> libc::pid_t {
    libc::pid_t::try_from(pid).expect("Linux pids stay below pid_max (at most 2^22, see proc(5)), so every pid fits in pid_t")
}

/// Waits for `pid` to exit (become a zombie, for our own children), up to `deadline`.
/// Returns false on timeout.
pub fn wait_exit(pid: i32, deadline: Duration) -> Result<bool> {
    match pidfd_open(pid) {
        Ok(fd) => poll_readable(&fd, deadline),
        // Already gone.
        Err(_) => Ok(true),
    }
}

fn pidfd_open(pid: i32) -> Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: pidfd_open(2) takes a pid and flags and returns a new descriptor.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    ensure!(fd >= 0, "pidfd_open({pid}): {}", std::io::Error::last_os_error());
    // syscall(2) returns a long; a descriptor is an int.
    let fd = i32::try_from(fd).with_context(|| format!("pidfd_open({pid}) returned {fd}, not a file descriptor"))?;
    // SAFETY: the kernel just gave us this descriptor; we are its only owner.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

/// Waits for a descriptor to become readable (a pidfd: its process exited).
fn poll_readable(fd: &impl std::os::fd::AsRawFd, deadline: Duration) -> Result<bool> {
    let mut pfd = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    let ms = i32::try_from(deadline.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: one pollfd that we own, for the duration of the call.
    let n = unsafe { libc::poll(&mut pfd, 1, ms) };
    ensure!(n >= 0, "poll on a pidfd: {}", std::io::Error::last_os_error());
    Ok(n == 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_lines_are_told_apart() {
        assert!(Version::V1_6.matches("containerd github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1+deb12u3"));
        assert!(!Version::V2_1.matches("containerd github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1+deb12u3"));
        assert!(Version::V2_1.matches("containerd github.com/containerd/containerd/v2 2.1.9+unknown "));
        assert!(!Version::V1_6.matches("containerd github.com/containerd/containerd/v2 2.16.0"));
        assert!(!Version::V1_6.matches(""));
    }

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(unescape_mount(r"/tmp/a\040b"), "/tmp/a b");
        assert_eq!(unescape_mount(r"/x\134y"), r"/x\y");
        assert_eq!(unescape_mount("/plain"), "/plain");
    }

    #[test]
    fn generated_configs_keep_the_snippets_and_add_private_paths() {
        for version in Version::ALL {
            let c = Containerd { version, dir: PathBuf::from("/tmp/x"), sriov: None, child: None, stopped: true, had_run_dir: true };
            let text = c.config();
            assert!(text.contains(version.config_snippet()), "{text}");
            assert!(text.find("root = \"/tmp/x/root\"").unwrap() < text.find("version =").unwrap(), "{text}");
            assert!(text.contains("address = \"/tmp/x/containerd.sock\""), "{text}");
        }
    }

    /// Both containerd versions read the generated config and keep vfvm's runtimes
    /// (`containerd config dump` parses without starting anything).
    #[test]
    fn both_containerd_versions_load_the_generated_config() {
        let dir = std::env::temp_dir().join(format!("vfvm-ctd-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for version in Version::ALL {
            version.check_installed().expect("containerd 1.6 and 2.1 are needed: run `cargo xtask install`");
            let c = Containerd { version, dir: dir.clone(), sriov: None, child: None, stopped: true, had_run_dir: true };
            let config = dir.join(format!("config-{}.toml", version.name()));
            std::fs::write(&config, c.config()).unwrap();
            let out = Command::new(version.containerd()).arg("--config").arg(&config).args(["config", "dump"]).output().unwrap();
            let dump = String::from_utf8_lossy(&out.stdout);
            assert!(out.status.success(), "containerd {} config dump: {}", version.name(), String::from_utf8_lossy(&out.stderr));
            for handler in ["kata", "rune"] {
                let table = match version {
                    Version::V1_6 => format!("[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.{handler}]"),
                    Version::V2_1 => format!("[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.{handler}]"),
                };
                let at = dump.find(&table).unwrap_or_else(|| panic!("containerd {}: no {table} in:\n{dump}", version.name()));
                let body: String = dump[at..].lines().skip(1).take_while(|l| !l.trim_start().starts_with('[')).collect();
                assert!(body.contains("io.containerd.vfvm.v2"), "containerd {}: {table} lost its runtime_type: {body}", version.name());
            }
            assert!(dump.contains(&dir.join("root").display().to_string()), "{dump}");
            // CRI: the test sandbox image and the private CNI config.
            let sandbox_image = match version {
                Version::V1_6 => format!("sandbox_image = \"{}\"", oci::PAUSE_REF),
                Version::V2_1 => format!("sandbox = '{}'", oci::PAUSE_REF),
            };
            assert!(dump.contains(&sandbox_image), "containerd {}: no {sandbox_image} in:\n{dump}", version.name());
            assert!(
                dump.contains(&c.cni_conf_dir().display().to_string()),
                "containerd {}: the CNI conf_dir is not ours:\n{dump}",
                version.name()
            );
            assert!(dump.contains(CNI_BIN_DIR), "containerd {}: no CNI bin dir {CNI_BIN_DIR}:\n{dump}", version.name());
            assert!(
                dump.contains("netns_mounts_under_state_dir = true"),
                "containerd {}: pod netns not under the state dir:\n{dump}",
                version.name()
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn commands_run_within_a_limit() {
        let out = output_within(Command::new("sh").args(["-c", "echo out; echo err >&2; exit 3"]), Duration::from_secs(30)).unwrap();
        assert_eq!((out.status.code(), out.stdout.as_slice(), out.stderr.as_slice()), (Some(3), &b"out\n"[..], &b"err\n"[..]));
        let started = Instant::now();
        let err = output_within(Command::new("sh").args(["-c", "echo partial; exec sleep 60"]), Duration::from_millis(300))
            .unwrap_err()
            .to_string();
        assert!(err.contains("still running") && err.contains("partial"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(30), "the command was not killed at its limit");
    }

    /// With an SR-IOV network: CRI loads two configs from a private plugin directory,
    /// and the second is the test plugin with the VF, its MAC and static IPAM.
    #[test]
    fn a_second_sriov_network_is_configured_beside_the_bridge() {
        let net = SriovNetwork {
            plugin: PathBuf::from("/b/vfvm-test-sriov-cni"),
            device_id: "0000:01:10.6".into(),
            mac: "02:00:00:00:10:29".into(),
            mtu: 1400,
            address: "198.18.0.41/24".into(),
            routes: vec![("198.19.41.0/24".into(), "198.18.0.254".into())],
        };
        for version in Version::ALL {
            let c = Containerd {
                version,
                dir: PathBuf::from("/tmp/x"),
                sriov: Some(net.clone()),
                child: None,
                stopped: true,
                had_run_dir: true,
            };
            let text = c.config();
            assert!(text.contains("max_conf_num = 2") && text.contains("/tmp/x/cni/bin") && !text.contains(CNI_BIN_DIR), "{text}");
            let conf: serde_json::Value = serde_json::from_str(&c.sriov_config(&net)).expect("JSON");
            let plugin = &conf["plugins"][0];
            assert_eq!(plugin["type"], "vfvm-test-sriov-cni");
            assert_eq!(
                (plugin["deviceID"].as_str(), plugin["mac"].as_str(), plugin["mtu"].as_u64()),
                (Some("0000:01:10.6"), Some("02:00:00:00:10:29"), Some(1400))
            );
            assert_eq!(plugin["cacheDir"], "/tmp/x/cni/sriov");
            assert_eq!(plugin["ipam"]["addresses"][0]["address"], "198.18.0.41/24");
            assert_eq!(plugin["ipam"]["routes"][0]["gw"], "198.18.0.254");
        }
    }

    #[test]
    fn the_cni_config_is_a_bridge_on_a_private_subnet() {
        let c =
            Containerd { version: Version::V1_6, dir: PathBuf::from("/tmp/x"), sriov: None, child: None, stopped: true, had_run_dir: true };
        let conf: serde_json::Value = serde_json::from_str(&c.cni_config()).expect("the CNI config is JSON");
        let bridge = &conf["plugins"][0];
        assert_eq!(bridge["type"], "bridge");
        assert!(CNI_BRIDGE.len() <= 15, "interface names have at most 15 bytes");
        assert_eq!(bridge["bridge"], CNI_BRIDGE);
        assert_eq!(bridge["ipam"]["ranges"][0][0]["subnet"], CNI_SUBNET);
        assert_eq!(bridge["ipam"]["dataDir"], "/tmp/x/cni/ipam", "IPAM state lives on the instance's tmpfs");
        assert_eq!(bridge["ipam"]["routes"][0]["dst"], "0.0.0.0/0", "pods get a default route through the bridge, as in a cluster");
        for plugin in ["bridge", "host-local", "loopback"] {
            assert!(
                Path::new(CNI_BIN_DIR).join(plugin).is_file(),
                "{CNI_BIN_DIR}/{plugin} missing: install containernetworking-plugins (`cargo xtask install`)"
            );
        }
    }
}
