//! The real `vfvm-agent` running containers on this machine (as root, real
//! namespaces, no VM): a busybox rootfs from busybox-static, OCI specs sent over
//! the agent API on a Unix socket, and what the processes really print and
//! return read back through the same API.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::json;
use vfvm_protocols::agent;

mod common;
use common::{code, RunningAgent};

struct Fixture {
    agent: RunningAgent,
    rootfs: PathBuf,
    containers: Mutex<Vec<String>>,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        for id in self.containers.lock().unwrap().drain(..) {
            let _ = self.agent.client.remove_container(ctx(), &agent::RemoveContainerRequest { container_id: id, ..Default::default() });
        }
        // Then `agent` drops: the agent stops, its netns and directory go.
    }
}

fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(i64::try_from(Duration::from_secs(20).as_nanos()).unwrap())
}

/// A busybox rootfs: the static binary and its applet links.
fn busybox_rootfs(dir: &Path) -> PathBuf {
    let root = dir.join("rootfs");
    for d in ["bin", "proc", "dev", "sys", "etc", "tmp", "home/user"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(root.join("tmp"), std::fs::Permissions::from_mode(0o1777)).unwrap();
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).expect("busybox-static at /bin/busybox (cargo xtask install)");
    // `busybox --install -s` links to the binary's absolute host path, which the
    // container does not have: link each applet to "busybox" relatively instead.
    let list = Command::new("/bin/busybox").arg("--list").output().unwrap();
    assert!(list.status.success());
    for applet in String::from_utf8(list.stdout).unwrap().lines().filter(|a| !a.is_empty() && *a != "busybox") {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
    }
    root
}

fn fixture(name: &str) -> Fixture {
    let agent = RunningAgent::start("vfvm-ctr", name);
    let rootfs = busybox_rootfs(&agent.dir);
    Fixture { agent, rootfs, containers: Mutex::default() }
}

/// An OCI spec as containerd writes one, for the busybox rootfs.
fn spec(args: &[&str], env: &[&str]) -> serde_json::Value {
    let mut e = vec!["PATH=/bin".to_string()];
    e.extend(env.iter().map(|s| s.to_string()));
    json!({
        "ociVersion": "1.1.0",
        "process": {
            "terminal": false,
            "user": {"uid": 1000, "gid": 1000, "additionalGids": [10, 20]},
            "args": args,
            "env": e,
            "cwd": "/home/user",
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 512}],
            "noNewPrivileges": true,
            "capabilities": {"bounding": ["CAP_KILL"]}
        },
        "root": {"path": "rootfs", "readonly": false},
        "hostname": "box1",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]}
        ],
        "linux": {
            "resources": {"memory": {"limit": 268435456}, "cpu": {"shares": 512, "quota": 50000, "period": 100000}, "pids": {"limit": 64}},
            "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}]
        },
        "someFutureField": {"ignored": true}
    })
}

impl Fixture {
    fn create(&self, id: &str, spec: &serde_json::Value) -> ttrpc::Result<()> {
        let req = agent::CreateContainerRequest {
            container_id: id.into(),
            oci_spec_json: serde_json::to_vec(spec).unwrap(),
            rootfs_path: self.rootfs.display().to_string(),
            ..Default::default()
        };
        self.agent.client.create_container(ctx(), &req)?;
        self.containers.lock().unwrap().push(id.into());
        Ok(())
    }

    fn start(&self, id: &str) -> ttrpc::Result<()> {
        self.agent.client.start_container(ctx(), &agent::StartContainerRequest { container_id: id.into(), ..Default::default() }).map(drop)
    }

    fn run(&self, id: &str, args: &[&str]) {
        self.create(id, &spec(args, &[])).unwrap();
        self.start(id).unwrap();
    }

    fn exec(&self, id: &str, exec_id: &str, args: &[&str]) -> ttrpc::Result<()> {
        self.exec_env(id, exec_id, args, &[])
    }

    fn exec_env(&self, id: &str, exec_id: &str, args: &[&str], env: &[&str]) -> ttrpc::Result<()> {
        let env: Vec<&str> = std::iter::once("PATH=/bin").chain(env.iter().copied()).collect();
        let process = json!({"args": args, "env": env, "cwd": "/", "user": {"uid": 0, "gid": 0}});
        let req = agent::ExecProcessRequest {
            container_id: id.into(),
            exec_id: exec_id.into(),
            oci_process_json: serde_json::to_vec(&process).unwrap(),
            ..Default::default()
        };
        self.agent.client.exec_process(ctx(), &req).map(drop)
    }

    fn wait(&self, id: &str, exec_id: &str) -> i32 {
        let req = agent::WaitProcessRequest { container_id: id.into(), exec_id: exec_id.into(), ..Default::default() };
        self.agent.client.wait_process(ctx(), &req).unwrap().exit_status
    }

    fn signal(&self, id: &str, exec_id: &str, signal: u32, all: bool) -> ttrpc::Result<()> {
        let req = agent::SignalProcessRequest { container_id: id.into(), exec_id: exec_id.into(), signal, all, ..Default::default() };
        self.agent.client.signal_process(ctx(), &req).map(drop)
    }

    /// Everything on stdout (or stderr) up to its end.
    fn output(&self, id: &str, exec_id: &str, stderr: bool) -> Vec<u8> {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut all = Vec::new();
        loop {
            assert!(Instant::now() < deadline, "no EOF on {id}/{exec_id} after 20 s; got {:?}", String::from_utf8_lossy(&all));
            let req = agent::ReadStreamRequest {
                container_id: id.into(),
                exec_id: exec_id.into(),
                max_len: 1 << 20,
                wait_ms: 1000,
                ..Default::default()
            };
            let r = if stderr { self.agent.client.read_stderr(ctx(), &req) } else { self.agent.client.read_stdout(ctx(), &req) }.unwrap();
            assert!(r.data.len() <= 1 << 20);
            all.extend_from_slice(&r.data);
            if r.eof {
                return all;
            }
        }
    }

    fn stdout(&self, id: &str, exec_id: &str) -> String {
        String::from_utf8(self.output(id, exec_id, false)).unwrap()
    }

    fn list(&self, id: &str) -> Vec<u32> {
        self.agent
            .client
            .list_processes(ctx(), &agent::ListProcessesRequest { container_id: id.into(), ..Default::default() })
            .unwrap()
            .pids
    }

    /// Events until one matches, within 10 s.
    fn event(&self, want: impl Fn(&agent::GetEventResponse) -> bool) -> agent::GetEventResponse {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let e = self.agent.client.get_event(ctx(), &agent::GetEventRequest { timeout_ms: 1000, ..Default::default() }).unwrap();
            if want(&e) {
                return e;
            }
        }
        panic!("no such event within 10 s");
    }

    fn healthy(&self) {
        assert_eq!(self.agent.client.health(ctx(), &agent::HealthRequest::new()).unwrap().api_version, "vfvm.agent.v1");
    }
}

fn exited(e: &agent::GetEventResponse, id: &str, exec_id: &str) -> Option<i32> {
    e.has_exited().then(|| e.exited()).filter(|x| x.container_id == id && x.exec_id == exec_id).map(|x| x.exit_status)
}

#[test]
fn a_container_runs_with_its_spec_and_reports_output_and_exit() {
    let f = fixture("hello");
    let args = ["sh", "-c", "echo hello; hostname; id -u; id -G; pwd; echo $FOO; ulimit -n; echo err >&2"];
    f.create("c1", &spec(&args, &["FOO=bar baz"])).unwrap();
    // Created, not started: nothing runs the program yet.
    let early = f
        .agent
        .client
        .read_stdout(ctx(), &agent::ReadStreamRequest { container_id: "c1".into(), max_len: 100, wait_ms: 200, ..Default::default() })
        .unwrap();
    assert!(early.data.is_empty() && !early.eof, "{early:?}");
    f.start("c1").unwrap();
    assert_eq!(f.stdout("c1", ""), "hello\nbox1\n1000\n1000 10 20\n/home/user\nbar baz\n512\n");
    assert_eq!(f.output("c1", "", true), b"err\n");
    assert_eq!(f.wait("c1", ""), 0);
    let e = f.event(|e| exited(e, "c1", "").is_some());
    assert_eq!(exited(&e, "c1", ""), Some(0));
    assert!(e.exited().exited_at_unix_nanos > 0);
    // Starting twice is refused; removing works once.
    assert_eq!(code(&f.start("c1").unwrap_err()), ttrpc::Code::FAILED_PRECONDITION);
    f.agent.client.remove_container(ctx(), &agent::RemoveContainerRequest { container_id: "c1".into(), ..Default::default() }).unwrap();
    let err = f
        .agent
        .client
        .remove_container(ctx(), &agent::RemoveContainerRequest { container_id: "c1".into(), ..Default::default() })
        .unwrap_err();
    assert_eq!(code(&err), ttrpc::Code::NOT_FOUND);
    f.healthy();
}

#[test]
fn exit_codes_and_signals_are_reported_as_a_shell_does() {
    let f = fixture("codes");
    f.run("three", &["sh", "-c", "exit 3"]);
    assert_eq!(f.wait("three", ""), 3);

    f.run("killed", &["sleep", "1000"]);
    f.signal("killed", "", 9, false).unwrap();
    assert_eq!(f.wait("killed", ""), 137);
    // Signalling what has exited: NOT_FOUND, not a recycled pid.
    assert_eq!(code(&f.signal("killed", "", 15, false).unwrap_err()), ttrpc::Code::NOT_FOUND);

    // SIGTERM to a `sleep` that is not its pid namespace's init (the kernel
    // shields an init from signals it has no handler for, as with runc).
    f.run("term", &["sleep", "1000"]);
    f.exec("term", "s", &["sleep", "1000"]).unwrap();
    f.signal("term", "s", 15, false).unwrap();
    assert_eq!(f.wait("term", "s"), 143);
    // `all`: every process of the container.
    f.exec("term", "s2", &["sleep", "1000"]).unwrap();
    f.signal("term", "", 9, true).unwrap();
    assert_eq!(f.wait("term", ""), 137);
    assert_eq!(f.wait("term", "s2"), 137);

    // A program that does not exist: Start says so, naming execve.
    f.create("nope", &spec(&["/bin/no-such-program"], &[])).unwrap();
    let err = f.start("nope").unwrap_err();
    assert_eq!(code(&err), ttrpc::Code::FAILED_PRECONDITION, "{err:?}");
    assert!(format!("{err:?}").contains("execve"), "{err:?}");
    assert_eq!(f.wait("nope", ""), 127);
    f.healthy();
}

#[test]
fn exec_joins_the_container_and_stdin_round_trips() {
    let f = fixture("exec");
    f.run("box", &["sleep", "1000"]);
    let init_pid = f.list("box");
    assert_eq!(init_pid.len(), 1, "{init_pid:?}");

    // The exec'd process sees the container's hostname, root and pid namespace:
    // pid 1 is the container's `sleep`.
    f.exec("box", "look", &["sh", "-c", "hostname; tr '\\0' ' ' < /proc/1/cmdline; echo; echo $$; ls /bin/busybox; exit 5"]).unwrap();
    let out = f.stdout("box", "look");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "box1", "{out}");
    assert_eq!(lines[1].trim(), "sleep 1000", "{out}");
    assert!(lines[2].parse::<u32>().unwrap() > 1, "{out}");
    assert_eq!(lines[3], "/bin/busybox", "{out}");
    assert_eq!(f.wait("box", "look"), 5);
    let e = f.event(|e| exited(e, "box", "look").is_some());
    assert_eq!(exited(&e, "box", "look"), Some(5));

    // stdin: a few hundred KiB through `cat`, byte for byte.
    f.exec("box", "cat", &["cat"]).unwrap();
    assert_eq!(f.list("box").len(), 2);
    let data: Vec<u8> = (0..300 * 1024u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13).to_le_bytes()[0]).collect();
    let mut sent = 0;
    let deadline = Instant::now() + Duration::from_secs(20);
    while sent < data.len() {
        assert!(Instant::now() < deadline, "stdin stuck at {sent}");
        let chunk = &data[sent..(sent + 100_000).min(data.len())];
        let req =
            agent::WriteStreamRequest { container_id: "box".into(), exec_id: "cat".into(), data: chunk.to_vec(), ..Default::default() };
        sent += f.agent.client.write_stdin(ctx(), &req).unwrap().written as usize;
    }
    f.agent
        .client
        .close_stdin(ctx(), &agent::CloseStdinRequest { container_id: "box".into(), exec_id: "cat".into(), ..Default::default() })
        .unwrap();
    let echoed = f.output("box", "cat", false);
    assert_eq!(echoed.len(), data.len());
    assert!(echoed == data, "cat's output differs from its input");
    assert_eq!(f.wait("box", "cat"), 0);

    // Back-pressure: 6 MB of output against a 4 MiB buffer. Unread, the writer
    // blocks (it has not reached its `echo done`); read, it all arrives.
    f.exec("box", "flood", &["sh", "-c", "head -c 6000000 /dev/zero; echo done >&2"]).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let req =
        agent::ReadStreamRequest { container_id: "box".into(), exec_id: "flood".into(), max_len: 100, wait_ms: 0, ..Default::default() };
    let r = f.agent.client.read_stderr(ctx(), &req).unwrap();
    assert!(r.data.is_empty() && !r.eof, "the writer was not held back: {r:?}");
    let flood = f.output("box", "flood", false);
    assert_eq!(flood.len(), 6_000_000);
    assert!(flood.iter().all(|b| *b == 0));
    assert_eq!(f.output("box", "flood", true), b"done\n");
    assert_eq!(f.wait("box", "flood"), 0);

    // Stats: from the cgroup where this machine has one.
    let s =
        f.agent.client.stats_container(ctx(), &agent::StatsContainerRequest { container_id: "box".into(), ..Default::default() }).unwrap();
    assert!(s.pids_current >= 1, "{s:?}");
    if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() || Path::new("/sys/fs/cgroup/unified/cgroup.controllers").exists() {
        assert!(s.cpu_usage_nanos > 0, "{s:?}");
    }
    if s.memory_limit_bytes != 0 {
        assert_eq!(s.memory_limit_bytes, 268435456);
    }

    // Exec ids are unique; an exec into an unknown container is NOT_FOUND.
    f.exec("box", "dup", &["true"]).unwrap();
    assert_eq!(code(&f.exec("box", "dup", &["true"]).unwrap_err()), ttrpc::Code::ALREADY_EXISTS);
    assert_eq!(code(&f.exec("nobox", "x", &["true"]).unwrap_err()), ttrpc::Code::NOT_FOUND);
    f.healthy();
}

#[test]
fn pcidevice_env_is_rewritten_to_guest_addresses() {
    let f = fixture("pci");
    let req = agent::CreateSandboxRequest {
        sandbox_id: "pod1".into(),
        hostname: "pod1".into(),
        pci_address_map: [("0000:3b:02.1".to_string(), "0000:00:05.0".to_string())].into(),
        ..Default::default()
    };
    f.agent.client.create_sandbox(ctx(), &req).unwrap();
    let info = r#"{"0000:3b:02.1":{"generic":{"deviceID":"0000:3b:02.1"}}}"#;
    let env = ["PCIDEVICE_INTEL_COM_SRIOV=0000:3b:02.1,0000:3b:09.9".to_string(), format!("PCIDEVICE_INTEL_COM_SRIOV_INFO={info}")];
    let env: Vec<&str> = env.iter().map(String::as_str).collect();
    f.create("p", &spec(&["sh", "-c", "echo $PCIDEVICE_INTEL_COM_SRIOV; echo $PCIDEVICE_INTEL_COM_SRIOV_INFO"], &env)).unwrap();
    f.start("p").unwrap();
    assert_eq!(f.stdout("p", ""), "0000:00:05.0,0000:3b:09.9\n{\"0000:00:05.0\":{\"generic\":{\"deviceID\":\"0000:00:05.0\"}}}\n");
    assert_eq!(f.wait("p", ""), 0);
    // An exec's env comes from the host-side spec too (CRI copies the container's):
    // rewritten the same way.
    f.run("q", &["sleep", "1000"]);
    f.exec_env("q", "e", &["sh", "-c", "echo $PCIDEVICE_INTEL_COM_SRIOV"], &["PCIDEVICE_INTEL_COM_SRIOV=0000:3b:02.1"]).unwrap();
    assert_eq!(f.stdout("q", "e"), "0000:00:05.0\n");
    assert_eq!(f.wait("q", "e"), 0);
    f.agent.client.destroy_sandbox(ctx(), &agent::DestroySandboxRequest { sandbox_id: "pod1".into(), ..Default::default() }).unwrap();
    // The sandbox's containers went with it.
    assert_eq!(
        code(
            &f.agent
                .client
                .list_processes(ctx(), &agent::ListProcessesRequest { container_id: "p".into(), ..Default::default() })
                .unwrap_err()
        ),
        ttrpc::Code::NOT_FOUND
    );
}

#[test]
fn bad_container_requests_get_clear_errors_and_the_agent_keeps_serving() {
    let f = fixture("badc");
    let create = |id: &str, json: Vec<u8>, rootfs: &str| {
        let req = agent::CreateContainerRequest {
            container_id: id.into(),
            oci_spec_json: json,
            rootfs_path: rootfs.into(),
            ..Default::default()
        };
        f.agent.client.create_container(ctx(), &req).unwrap_err()
    };
    let root = f.rootfs.display().to_string();
    let good = serde_json::to_vec(&spec(&["true"], &[])).unwrap();

    let err = create("m", b"{\"process\": {\"args\": [".to_vec(), &root);
    assert_eq!(code(&err), ttrpc::Code::INVALID_ARGUMENT, "{err:?}");
    assert!(format!("{err:?}").contains("oci spec"), "{err:?}");
    let err = create("m", br#"{"process": {"args": "not a list"}}"#.to_vec(), &root);
    assert_eq!(code(&err), ttrpc::Code::INVALID_ARGUMENT, "{err:?}");

    let mut big = good.clone();
    big.resize((1 << 20) + 1, b' ');
    let err = create("big", big, &root);
    assert_eq!(code(&err), ttrpc::Code::INVALID_ARGUMENT, "{err:?}");
    assert!(format!("{err:?}").contains("at most"), "{err:?}");

    for bad in ["a/b", "", "../x", &"x".repeat(129), "sp ace"] {
        let err = create(bad, good.clone(), &root);
        assert_eq!(code(&err), ttrpc::Code::INVALID_ARGUMENT, "{bad:?}: {err:?}");
    }

    let err = create("nofs", good.clone(), "/nonexistent/rootfs");
    assert_eq!(code(&err), ttrpc::Code::INVALID_ARGUMENT, "{err:?}");
    assert!(format!("{err:?}").contains("/nonexistent/rootfs"), "{err:?}");

    let err = f.start("ghost").unwrap_err();
    assert_eq!(code(&err), ttrpc::Code::NOT_FOUND, "{err:?}");
    let err =
        f.agent.client.wait_process(ctx(), &agent::WaitProcessRequest { container_id: "ghost".into(), ..Default::default() }).unwrap_err();
    assert_eq!(code(&err), ttrpc::Code::NOT_FOUND, "{err:?}");

    f.create("dup", &spec(&["true"], &[])).unwrap();
    assert_eq!(code(&f.create("dup", &spec(&["true"], &[])).unwrap_err()), ttrpc::Code::ALREADY_EXISTS);
    // Exec before start; an unknown process; a bad signal.
    assert_eq!(code(&f.exec("dup", "e", &["true"]).unwrap_err()), ttrpc::Code::FAILED_PRECONDITION);
    assert_eq!(code(&f.signal("dup", "nosuch", 9, false).unwrap_err()), ttrpc::Code::NOT_FOUND);
    assert_eq!(code(&f.signal("dup", "", 999, false).unwrap_err()), ttrpc::Code::INVALID_ARGUMENT);
    let err = f.agent.client.get_event(ctx(), &agent::GetEventRequest { timeout_ms: 600_000, ..Default::default() }).unwrap_err();
    assert_eq!(code(&err), ttrpc::Code::INVALID_ARGUMENT);
    f.start("dup").unwrap();
    assert_eq!(f.wait("dup", ""), 0);
    f.healthy();
}

/// What a terminal process prints: `tty`, its terminal's owner, `stty size`;
/// then, after a line of input (sent once the test has resized it), `stty size`
/// again and the line.
const TTY_SCRIPT: &str =
    "test -t 0 && test -t 1 && echo istty; tty; stat -c owner=%u:%g $(tty); stty size; read line; stty size; echo got $line";

impl Fixture {
    fn exec_tty(&self, id: &str, exec_id: &str, args: &[&str], rows: u32, cols: u32) -> ttrpc::Result<()> {
        let process = json!({"args": args, "env": ["PATH=/bin"], "cwd": "/", "user": {"uid": 0, "gid": 0}, "terminal": true, "consoleSize": {"height": rows, "width": cols}});
        let req = agent::ExecProcessRequest {
            container_id: id.into(),
            exec_id: exec_id.into(),
            oci_process_json: serde_json::to_vec(&process).unwrap(),
            ..Default::default()
        };
        self.agent.client.exec_process(ctx(), &req).map(drop)
    }

    /// Stdout (pty output, \r dropped) until it contains `want`, within 20 s.
    fn stdout_until(&self, id: &str, exec_id: &str, want: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut all = Vec::new();
        loop {
            let text = String::from_utf8_lossy(&all).replace('\r', "");
            if text.contains(want) {
                return text;
            }
            assert!(Instant::now() < deadline, "no {want:?} on {id}/{exec_id} after 20 s; got {text:?}");
            let req = agent::ReadStreamRequest {
                container_id: id.into(),
                exec_id: exec_id.into(),
                max_len: 1 << 20,
                wait_ms: 1000,
                ..Default::default()
            };
            let r = self.agent.client.read_stdout(ctx(), &req).unwrap();
            all.extend_from_slice(&r.data);
            assert!(!r.eof || !r.data.is_empty() || text.contains(want), "EOF on {id}/{exec_id} before {want:?}; got {text:?}");
        }
    }

    fn resize(&self, id: &str, exec_id: &str, rows: u32, columns: u32) -> ttrpc::Result<()> {
        let req = agent::TtyWinResizeRequest { container_id: id.into(), exec_id: exec_id.into(), rows, columns, ..Default::default() };
        self.agent.client.tty_win_resize(ctx(), &req).map(drop)
    }

    fn write(&self, id: &str, exec_id: &str, data: &[u8]) -> usize {
        let req = agent::WriteStreamRequest { container_id: id.into(), exec_id: exec_id.into(), data: data.to_vec(), ..Default::default() };
        self.agent.client.write_stdin(ctx(), &req).unwrap().written as usize
    }

    /// Runs [`TTY_SCRIPT`] through: its first size is `first`; it is resized to
    /// `second` before it reads its line, so its second `stty size` says so.
    /// Returns its whole output (\r dropped).
    fn tty_round(&self, id: &str, exec_id: &str, first: (u32, u32), second: (u32, u32)) -> String {
        let before = self.stdout_until(id, exec_id, &format!("{} {}\n", first.0, first.1));
        self.resize(id, exec_id, second.0, second.1).unwrap();
        assert_eq!(self.write(id, exec_id, b"ping\n"), 5);
        let after = String::from_utf8(self.output(id, exec_id, false)).unwrap().replace('\r', "");
        let out = before + &after;
        assert!(out.contains("istty\n"), "{out:?}");
        assert!(out.contains(&format!("{} {}\n", second.0, second.1)), "the resize did not reach the process: {out:?}");
        assert!(out.contains("got ping\n"), "{out:?}");
        out
    }
}

/// The `tty` line of [`TTY_SCRIPT`]'s output: a /dev/pts/N.
fn pts_name(out: &str) -> &str {
    assert!(!out.contains("not a tty"), "{out:?}");
    let name = out.lines().find(|l| l.starts_with("/dev/")).unwrap_or_else(|| panic!("no tty name in {out:?}"));
    let n = name.strip_prefix("/dev/pts/").unwrap_or_else(|| panic!("{name:?} is not in /dev/pts: {out:?}"));
    assert!(n.parse::<u32>().is_ok(), "{name:?}: {out:?}");
    name
}

#[test]
fn a_terminal_process_gets_a_pty_of_the_given_size() {
    let f = fixture("tty");
    // The init, as uid 1000: a pty in the container's own devpts, which `tty`
    // names, owned by the process's user (group tty, from the devpts mount).
    let mut s = spec(&["sh", "-c", TTY_SCRIPT], &[]);
    s["process"]["terminal"] = json!(true);
    s["process"]["consoleSize"] = json!({"height": 40, "width": 100});
    f.create("t", &s).unwrap();
    f.start("t").unwrap();
    let out = f.tty_round("t", "", (40, 100), (50, 120));
    let name = pts_name(&out);
    assert!(out.contains("owner=1000:5\n"), "{out:?}");
    assert_eq!(f.wait("t", ""), 0);
    // The container's devpts is its own instance: its first pty is pts/0.
    assert_eq!(name, "/dev/pts/0", "{out:?}");

    // An exec with a terminal gets one in the same devpts, as `ctr task exec -t`.
    f.run("box", &["sleep", "1000"]);
    f.exec_tty("box", "sh", &["sh", "-c", TTY_SCRIPT], 20, 70).unwrap();
    let out = f.tty_round("box", "sh", (20, 70), (33, 99));
    pts_name(&out);
    assert!(out.contains("owner=0:5\n"), "{out:?}");
    assert_eq!(f.wait("box", "sh"), 0);
    // Two at once get two ptys of that devpts.
    f.exec_tty("box", "a", &["sh", "-c", "tty; read x"], 10, 10).unwrap();
    f.exec_tty("box", "b", &["sh", "-c", "tty; read x"], 10, 10).unwrap();
    let a = f.stdout_until("box", "a", "\n");
    let b = f.stdout_until("box", "b", "\n");
    assert_ne!(pts_name(&a), pts_name(&b));
    f.write("box", "a", b"\n");
    f.write("box", "b", b"\n");
    assert_eq!(f.wait("box", "a"), 0);
    assert_eq!(f.wait("box", "b"), 0);

    // A pty that cannot be allocated (a tmpfs hides the devpts): Create fails,
    // naming the step, and the agent goes on.
    let mut s = spec(&["true"], &[]);
    s["mounts"].as_array_mut().unwrap().push(json!({"destination": "/dev/pts", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid"]}));
    s["process"]["terminal"] = json!(true);
    let err = f.create("noptmx", &s).unwrap_err();
    assert_eq!(code(&err), ttrpc::Code::FAILED_PRECONDITION, "{err:?}");
    assert!(format!("{err:?}").contains("open the terminal's ptmx"), "{err:?}");

    // No terminal, no resize.
    f.run("plain", &["true"]);
    assert_eq!(code(&f.resize("plain", "", 5, 5).unwrap_err()), ttrpc::Code::FAILED_PRECONDITION);
    f.healthy();
}

#[test]
fn without_a_devpts_of_its_own_a_terminal_comes_from_the_guests() {
    let f = fixture("ttyguest");
    // No devpts in the spec: the pty is the guest's (the agent's /dev/ptmx), a
    // working terminal of the given size that resizes, for the init and execs.
    let mut s = spec(&["sh", "-c", "test -t 0 && test -t 1 && echo istty; stty size; read line; stty size; echo got $line"], &[]);
    s["mounts"] = json!([{"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]}]);
    s["process"]["terminal"] = json!(true);
    s["process"]["consoleSize"] = json!({"height": 40, "width": 100});
    f.create("g", &s).unwrap();
    f.start("g").unwrap();
    f.tty_round("g", "", (40, 100), (41, 101));
    assert_eq!(f.wait("g", ""), 0);

    s["process"]["terminal"] = json!(false);
    s["process"]["args"] = json!(["sleep", "1000"]);
    f.create("gbox", &s).unwrap();
    f.start("gbox").unwrap();
    f.exec_tty(
        "gbox",
        "sh",
        &["sh", "-c", "test -t 0 && test -t 1 && echo istty; stty size; read line; stty size; echo got $line"],
        20,
        70,
    )
    .unwrap();
    f.tty_round("gbox", "sh", (20, 70), (21, 71));
    assert_eq!(f.wait("gbox", "sh"), 0);
    f.healthy();
}
