//! `vfvm-crictl`: crictl's command line for the CRI calls the project's tests
//! make. Usage: `vfvm-crictl --help`.
//!
//! It fails as crictl v1.32 fails: one logrus line on stderr,
//! `time="..." level=fatal msg="<error>"` with the error Go-quoted, and exit
//! status 1. The error reads as crictl's: its command's words around the runtime's
//! gRPC error (`run pod sandbox: rpc error: code = ... desc = ...`). The wrapping
//! words below are crictl v1.32's wording (cri-tools `cmd/crictl`), one comment
//! each where they are set.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use k8s_cri::v1 as cri;
use vfvm_crictl::client::{self, status_message, Client};
use vfvm_crictl::logrus::{fatal_line, go_quote, log_line};
use vfvm_crictl::{config, inspect, logs};

const USAGE: &str = "usage: vfvm-crictl [--runtime-endpoint|-r unix:///PATH] [--timeout|-t DURATION] COMMAND [ARGS]

A crictl-compatible CRI client. The endpoint defaults to $CONTAINER_RUNTIME_ENDPOINT,
then unix:///run/containerd/containerd.sock; the timeout (per call, e.g. 300, 300s, 5m)
to 300s. --image-endpoint/-i and --debug/-D are accepted and ignored.

commands:
  runp [--runtime|-r HANDLER] POD-CONFIG.json           run a pod sandbox; prints its id
  create [--no-pull] POD-ID CONTAINER-CONFIG.json POD-CONFIG.json
                                                        create a container; prints its id
  start CONTAINER...                                    start containers
  exec [-s|--sync] [--timeout SECS] CONTAINER CMD [ARG...]
                                                        run a command in a container (always
                                                        through ExecSync); a command that exits
                                                        non-zero fails exec (exit status 1).
                                                        With -s, as crictl's: its stdout, then its
                                                        stderr, each with a newline, on stdout;
                                                        without, its two streams as they came
  logs CONTAINER                                        print a container's log
  ps [-a] [-q] [--pod|-p POD] [--id ID] [--state STATE] [--name NAME] [--no-trunc]
                                                        list containers (running only without -a)
  pods [-q] [--id ID] [--state ready|notready] [--name NAME] [--no-trunc]
                                                        list pod sandboxes
  inspect CONTAINER...  |  inspectp POD...              status and runtime info, as JSON
  stop [-t|--timeout SECS] CONTAINER...  |  rm [-f] [-k|--keep-logs] CONTAINER...
  stopp POD...  |  rmp [-f] POD...          (rm and rmp refuse what runs, unless -f)
  update [--memory BYTES] [--cpu-quota N] [--cpu-period N] [--cpu-share N] CONTAINER...
                                                        change a running container's limits
                                                        (what is not given stays as it is)
  version

Errors go to stderr as crictl writes them (a logrus line, level=fatal, the message
Go-quoted), with exit status 1.";

/// VMs boot slowly in the lab (L3 under emulated SVM): a generous default.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);
const DEFAULT_ENDPOINT: &str = "unix:///run/containerd/containerd.sock";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(args) {
        Ok(code) => code,
        Err(e) => {
            // crictl's `logrus.Fatal(err)`: the error, on one line, and exit status 1.
            let message = match e.downcast_ref::<ExecFailed>() {
                Some(failed) => failed.0.clone(),
                None => format!("{e:#}").into_bytes(),
            };
            eprintln!("{}", fatal_line(SystemTime::now(), &message));
            ExitCode::FAILURE
        }
    }
}

/// The failure of `exec` when the command exits non-zero, as its whole message in
/// bytes: the command's stderr is part of it as it came, as in crictl's (whose
/// quoting then escapes what is not UTF-8).
#[derive(Debug)]
struct ExecFailed(Vec<u8>);

impl std::fmt::Display for ExecFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&String::from_utf8_lossy(&self.0))
    }
}

impl std::error::Error for ExecFailed {}

/// crictl v1.32's error for `exec -s` of a command that exits with `code` (not 0):
/// the k8s cri-client's ExecSync error, `command '<cmd joined by spaces>' exited
/// with <code>: <stderr>`, in crictl's "execing command in container <id>
/// synchronously: " (crictl prints nothing of the command's stdout then).
fn exec_sync_failure(id: &str, cmd: &[String], code: i32, stderr: &[u8]) -> Vec<u8> {
    let mut message =
        format!("execing command in container {id} synchronously: command '{}' exited with {code}: ", cmd.join(" ")).into_bytes();
    message.extend_from_slice(stderr);
    message
}

/// crictl v1.32's error for a streaming `exec` (no `-s`) of a command that exits
/// with `code` (not 0): client-go's remotecommand error in crictl's words.
fn exec_stream_failure(id: &str, code: i32) -> String {
    format!("execing command in container {id}: command terminated with exit code {code}")
}

/// What `exec -s` prints of a command that exited 0, as crictl v1.32 does:
/// `fmt.Println` of its stdout, then of its stderr, both on stdout.
fn exec_sync_output(stdout: &[u8], stderr: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(stdout.len() + stderr.len() + 2);
    out.extend_from_slice(stdout);
    out.push(b'\n');
    out.extend_from_slice(stderr);
    out.push(b'\n');
    out
}

/// Several failures as one, as crictl's `rm` and `rmp` report theirs (k8s's
/// `errors.NewAggregate`): one is itself; more, without repeats, `[a, b]`.
fn aggregate(errors: Vec<String>) -> Result<()> {
    let mut seen: Vec<String> = Vec::new();
    for e in errors {
        if !seen.contains(&e) {
            seen.push(e);
        }
    }
    match seen.len() {
        0 => Ok(()),
        1 => bail!("{}", seen[0]),
        _ => bail!("[{}]", seen.join(", ")),
    }
}

/// An id in an error, as Go's `%q` writes it (crictl's `stopping the pod sandbox %q`).
fn q(id: &str) -> String {
    go_quote(id.as_bytes())
}

/// The command line, one argument at a time; options may be written `--opt VALUE`
/// or `--opt=VALUE`.
struct Args {
    rest: std::collections::VecDeque<String>,
}

impl Args {
    /// The value of an option that takes one: after `=`, or the next argument.
    fn value(&mut self, arg: &str, inline: Option<String>) -> Result<String> {
        match inline {
            Some(v) => Ok(v),
            None => self.rest.pop_front().with_context(|| format!("{arg} needs a value")),
        }
    }

    /// Splits `--opt=value` into its parts.
    fn next_option(&mut self) -> Option<(String, Option<String>)> {
        let arg = self.rest.front()?;
        if !arg.starts_with('-') || arg == "-" {
            return None;
        }
        let arg = self.rest.pop_front()?;
        if arg == "--" {
            return None;
        }
        match arg.split_once('=') {
            Some((k, v)) if k.starts_with("--") => Some((k.to_string(), Some(v.to_string()))),
            _ => Some((arg, None)),
        }
    }

    fn positional(&mut self, what: &str) -> Result<String> {
        self.rest.pop_front().with_context(|| format!("missing {what} (vfvm-crictl --help)"))
    }

    fn all(&mut self, what: &str) -> Result<Vec<String>> {
        let all: Vec<String> = self.rest.drain(..).collect();
        if all.is_empty() {
            bail!("missing {what} (vfvm-crictl --help)");
        }
        Ok(all)
    }

    fn done(&self) -> Result<()> {
        match self.rest.front() {
            Some(extra) => bail!("unexpected argument {extra:?} (vfvm-crictl --help)"),
            None => Ok(()),
        }
    }
}

fn run(argv: Vec<String>) -> Result<ExitCode> {
    let mut args = Args { rest: argv.into() };
    let mut endpoint = std::env::var("CONTAINER_RUNTIME_ENDPOINT").ok().filter(|e| !e.is_empty());
    let mut timeout = DEFAULT_TIMEOUT;
    while let Some((opt, inline)) = args.next_option() {
        match opt.as_str() {
            "-r" | "--runtime-endpoint" => endpoint = Some(args.value(&opt, inline)?),
            "-i" | "--image-endpoint" => {
                args.value(&opt, inline)?;
            }
            "-t" | "--timeout" => {
                let v = args.value(&opt, inline)?;
                timeout = parse_duration(&v).with_context(|| format!("{opt} {v:?}"))?;
            }
            "-D" | "--debug" => {}
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(ExitCode::SUCCESS);
            }
            other => bail!("unknown global option {other} (vfvm-crictl --help)"),
        }
    }
    let command = args.positional("a command")?;
    if command == "help" {
        println!("{USAGE}");
        return Ok(ExitCode::SUCCESS);
    }
    const COMMANDS: &[&str] = &[
        "runp", "create", "start", "exec", "logs", "ps", "pods", "inspect", "inspectp", "stop", "rm", "stopp", "rmp", "update", "version",
    ];
    if !COMMANDS.contains(&command.as_str()) {
        bail!("unknown command {command:?} (vfvm-crictl --help)");
    }
    let endpoint = endpoint.unwrap_or_else(|| DEFAULT_ENDPOINT.to_string());
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the async runtime")?;
    rt.block_on(async move {
        // The connection's own error as it is (crictl's is its gRPC dial error).
        let mut c = client::connect(&endpoint, timeout).await?;
        let c = &mut c;
        match command.as_str() {
            "runp" => runp(c, &mut args).await,
            "create" => create(c, &mut args).await,
            "start" => start(c, &mut args).await,
            "exec" => exec(c, &mut args).await,
            "logs" => container_logs(c, &mut args).await,
            "ps" => ps(c, &mut args).await,
            "pods" => pods(c, &mut args).await,
            "inspect" => inspect_containers(c, &mut args).await,
            "inspectp" => inspect_pods(c, &mut args).await,
            "stop" => stop(c, &mut args).await,
            "rm" => rm(c, &mut args).await,
            "stopp" => stopp(c, &mut args).await,
            "rmp" => rmp(c, &mut args).await,
            "update" => update(c, &mut args).await,
            "version" => version(c).await,
            other => unreachable!("command {other:?} is not in COMMANDS"),
        }
    })
}

/// Go's duration syntax as crictl takes it (`300s`, `5m`, `1m30s`, `500ms`); a bare
/// number is seconds.
fn parse_duration(text: &str) -> Result<Duration> {
    if let Ok(secs) = text.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    let mut total = 0f64;
    let mut rest = text;
    if rest.is_empty() {
        bail!("empty duration");
    }
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
        let n: f64 = rest[..digits].parse().with_context(|| format!("{text:?} is not a duration (e.g. 300s, 5m, 1m30s)"))?;
        rest = &rest[digits..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            unit => bail!("{text:?}: unknown unit {unit:?} (ns, us, ms, s, m, h)"),
        };
        total += n * scale;
        rest = &rest[unit_len..];
    }
    Ok(Duration::from_secs_f64(total))
}

fn rpc(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{}", status_message(&s))
}

async fn runp(c: &mut Client, args: &mut Args) -> Result<ExitCode> {
    let mut handler = String::new();
    while let Some((opt, inline)) = args.next_option() {
        match opt.as_str() {
            "-r" | "--runtime" => handler = args.value(&opt, inline)?,
            other => bail!("runp: unknown option {other}"),
        }
    }
    let file = args.positional("the pod config file")?;
    args.done()?;
    // crictl v1.32's wording: "load podSandboxConfig: ...", "run pod sandbox: ...".
    let config = config::load_pod_config(Path::new(&file)).context("load podSandboxConfig")?;
    let resp = c
        .run_pod_sandbox(cri::RunPodSandboxRequest { config: Some(config), runtime_handler: handler })
        .await
        .map_err(rpc)
        .context("run pod sandbox")?;
    println!("{}", resp.into_inner().pod_sandbox_id);
    Ok(ExitCode::SUCCESS)
}

async fn create(c: &mut Client, args: &mut Args) -> Result<ExitCode> {
    while let Some((opt, _)) = args.next_option() {
        match opt.as_str() {
            // The image must already be there: this client never pulls.
            "--no-pull" => {}
            other => bail!("create: unknown option {other} (images are never pulled)"),
        }
    }
    let pod = args.positional("the pod id")?;
    let container_file = args.positional("the container config file")?;
    let pod_file = args.positional("the pod config file")?;
    args.done()?;
    // crictl v1.32's wording: "creating container: ..." (its config files' errors too).
    let config = config::load_container_config(Path::new(&container_file)).context("creating container")?;
    let sandbox_config = config::load_pod_config(Path::new(&pod_file)).context("creating container")?;
    let resp = c
        .create_container(cri::CreateContainerRequest { pod_sandbox_id: pod, config: Some(config), sandbox_config: Some(sandbox_config) })
        .await
        .map_err(rpc)
        .context("creating container")?;
    println!("{}", resp.into_inner().container_id);
    Ok(ExitCode::SUCCESS)
}

async fn start(c: &mut Client, args: &mut Args) -> Result<ExitCode> {
    for id in args.all("the container id")? {
        // crictl v1.32's wording: "starting the container \"ID\": ...".
        c.start_container(cri::StartContainerRequest { container_id: id.clone() })
            .await
            .map_err(rpc)
            .with_context(|| format!("starting the container {}", q(&id)))?;
        println!("{id}");
    }
    Ok(ExitCode::SUCCESS)
}

async fn exec(c: &mut Client, args: &mut Args) -> Result<ExitCode> {
    let mut timeout = 0i64;
    let mut sync = false;
    while let Some((opt, inline)) = args.next_option() {
        match opt.as_str() {
            // Every exec runs through ExecSync here (no streaming server needed);
            // -s chooses crictl's way of printing the result.
            "-s" | "--sync" => sync = true,
            "--timeout" => {
                let v = args.value(&opt, inline)?;
                timeout = v.parse().with_context(|| format!("exec --timeout {v:?}: seconds expected"))?;
            }
            "-i" | "--interactive" | "-t" | "--tty" => bail!("exec {opt}: only non-interactive commands are supported (ExecSync)"),
            other => bail!("exec: unknown option {other}"),
        }
    }
    let id = args.positional("the container id")?;
    let cmd = args.all("the command")?;
    // crictl v1.32's wording: "execing command in container ID synchronously: ..."
    // with -s, "execing command in container ID: ..." without.
    let resp = c
        .exec_sync(cri::ExecSyncRequest { container_id: id.clone(), cmd: cmd.clone(), timeout })
        .await
        .map_err(rpc)
        .with_context(|| format!("execing command in container {id}{}", if sync { " synchronously" } else { "" }))?
        .into_inner();
    if sync {
        if resp.exit_code != 0 {
            return Err(ExecFailed(exec_sync_failure(&id, &cmd, resp.exit_code, &resp.stderr)).into());
        }
        let mut out = std::io::stdout().lock();
        out.write_all(&exec_sync_output(&resp.stdout, &resp.stderr))?;
        out.flush()?;
    } else {
        // What a streaming exec shows: each stream on its own.
        let mut out = std::io::stdout().lock();
        out.write_all(&resp.stdout)?;
        out.flush()?;
        std::io::stderr().write_all(&resp.stderr)?;
        if resp.exit_code != 0 {
            bail!("{}", exec_stream_failure(&id, resp.exit_code));
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn container_logs(c: &mut Client, args: &mut Args) -> Result<ExitCode> {
    let id = args.positional("the container id")?;
    args.done()?;
    // crictl v1.32's wording: the status call's error as it is; "the container has
    // not set log path"; the cri-client's "failed to open log file \"PATH\": ...".
    let status =
        c.container_status(cri::ContainerStatusRequest { container_id: id.clone(), verbose: false }).await.map_err(rpc)?.into_inner();
    let path = status.status.map(|s| s.log_path).unwrap_or_default();
    if path.is_empty() {
        bail!("the container has not set log path");
    }
    let text = std::fs::read_to_string(&path).with_context(|| format!("failed to open log file {}", q(&path)))?;
    let chunks = logs::render(&text).with_context(|| format!("{path}: not a CRI log"))?;
    let (mut out, mut err) = (std::io::stdout().lock(), std::io::stderr().lock());
    for (stream, chunk) in chunks {
        match stream {
            logs::Stream::Stdout => out.write_all(chunk.as_bytes())?,
            logs::Stream::Stderr => err.write_all(chunk.as_bytes())?,
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// crictl's CREATED column: "12 seconds ago", for a time in nanoseconds since the epoch.
fn ago(nanos: i64) -> String {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX));
    let secs = now.saturating_sub(nanos).max(0) / 1_000_000_000;
    format!("{} ago", human_duration(secs))
}

/// Docker's `units.HumanDuration` (what crictl prints in CREATED) of `secs` seconds.
fn human_duration(secs: i64) -> String {
    let (minutes, hours) = (secs / 60, (secs + 1800) / 3600);
    match secs {
        s if s < 1 => "Less than a second".into(),
        1 => "1 second".into(),
        s if s < 60 => format!("{s} seconds"),
        _ if minutes == 1 => "About a minute".into(),
        _ if minutes < 60 => format!("{minutes} minutes"),
        _ if hours == 1 => "About an hour".into(),
        _ if hours < 48 => format!("{hours} hours"),
        _ if hours < 24 * 7 * 2 => format!("{} days", hours / 24),
        _ if hours < 24 * 30 * 2 => format!("{} weeks", hours / 24 / 7),
        _ if hours < 24 * 365 * 2 => format!("{} months", hours / 24 / 30),
        s => format!("{} years", s / 3600 / 24 / 365),
    }
}

fn trunc(id: &str, no_trunc: bool) -> &str {
    if no_trunc {
        id
    } else {
        &id[..id.len().min(13)]
    }
}

fn container_state(name: &str) -> Result<cri::ContainerState> {
    Ok(match name.to_ascii_lowercase().as_str() {
        "created" => cri::ContainerState::ContainerCreated,
        "running" => cri::ContainerState::ContainerRunning,
        "exited" => cri::ContainerState::ContainerExited,
        "unknown" => cri::ContainerState::ContainerUnknown,
        other => bail!("--state {other:?}: created, running, exited or unknown"),
    })
}

async fn ps(c: &mut Client, args: &mut Args) -> Result<ExitCode> {
    let (mut all, mut quiet, mut no_trunc) = (false, false, false);
    let mut filter = cri::ContainerFilter::default();
    let mut name = None;
    while let Some((opt, inline)) = args.next_option() {
        match opt.as_str() {
            "-a" | "--all" => all = true,
            "-q" | "--quiet" => quiet = true,
            "--no-trunc" => no_trunc = true,
            "-p" | "--pod" => filter.pod_sandbox_id = args.value(&opt, inline)?,
            "--id" => filter.id = args.value(&opt, inline)?,
            "--name" => name = Some(args.value(&opt, inline)?),
            "-s" | "--state" => {
                filter.state = Some(cri::ContainerStateValue { state: container_state(&args.value(&opt, inline)?)? as i32 })
            }
            other => bail!("ps: unknown option {other}"),
        }
    }
    args.done()?;
    if !all && filter.state.is_none() {
        filter.state = Some(cri::ContainerStateValue { state: cri::ContainerState::ContainerRunning as i32 });
    }
    // crictl v1.32's wording.
    let mut list = c
        .list_containers(cri::ListContainersRequest { filter: Some(filter) })
        .await
        .map_err(rpc)
        .context("call list containers RPC")
        .context("list containers")
        .context("listing containers")?
        .into_inner()
        .containers;
    if let Some(n) = &name {
        list.retain(|x| x.metadata.as_ref().is_some_and(|m| m.name.contains(n.as_str())));
    }
    list.sort_by_key(|x| std::cmp::Reverse(x.created_at));
    let mut out = std::io::stdout().lock();
    if quiet {
        for x in &list {
            writeln!(out, "{}", x.id)?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    writeln!(
        out,
        "{:<13}  {:<24}  {:<16}  {:<18}  {:<16}  {:<7}  {:<13}  POD",
        "CONTAINER", "IMAGE", "CREATED", "STATE", "NAME", "ATTEMPT", "POD ID"
    )?;
    for x in &list {
        let (name, attempt) = x.metadata.as_ref().map_or(("", 0), |m| (m.name.as_str(), m.attempt));
        let image = x.image.as_ref().map_or("", |i| i.image.as_str());
        let state = cri::ContainerState::try_from(x.state).map_or("CONTAINER_UNKNOWN", |s| s.as_str_name());
        let pod_name = x.labels.get("io.kubernetes.pod.name").map_or("", String::as_str);
        writeln!(
            out,
            "{:<13}  {:<24}  {:<16}  {:<18}  {:<16}  {:<7}  {:<13}  {pod_name}",
            trunc(&x.id, no_trunc),
            image,
            ago(x.created_at),
            state.trim_start_matches("CONTAINER_").to_ascii_title(),
            name,
            attempt,
            trunc(&x.pod_sandbox_id, no_trunc)
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

async fn pods(c: &mut Client, args: &mut Args) -> Result<ExitCode> {
    let (mut quiet, mut no_trunc) = (false, false);
    let mut filter = cri::PodSandboxFilter::default();
    let mut name = None;
    while let Some((opt, inline)) = args.next_option() {
        match opt.as_str() {
            "-q" | "--quiet" => quiet = true,
            "--no-trunc" => no_trunc = true,
            "--id" => filter.id = args.value(&opt, inline)?,
            "--name" => name = Some(args.value(&opt, inline)?),
            "-s" | "--state" => {
                let v = args.value(&opt, inline)?;
                let state = match v.to_ascii_lowercase().as_str() {
                    "ready" => cri::PodSandboxState::SandboxReady,
                    "notready" => cri::PodSandboxState::SandboxNotready,
                    other => bail!("pods --state {other:?}: ready or notready"),
                };
                filter.state = Some(cri::PodSandboxStateValue { state: state as i32 });
            }
            other => bail!("pods: unknown option {other}"),
        }
    }
    args.done()?;
    // crictl v1.32's wording.
    let mut list = c
        .list_pod_sandbox(cri::ListPodSandboxRequest { filter: Some(filter) })
        .await
        .map_err(rpc)
        .context("call list sandboxes RPC")
        .context("list pod sandboxes")
        .context("listing pod sandboxes")?
        .into_inner()
        .items;
    if let Some(n) = &name {
        list.retain(|p| p.metadata.as_ref().is_some_and(|m| m.name.contains(n.as_str())));
    }
    list.sort_by_key(|p| std::cmp::Reverse(p.created_at));
    let mut out = std::io::stdout().lock();
    if quiet {
        for p in &list {
            writeln!(out, "{}", p.id)?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    writeln!(out, "{:<13}  {:<16}  {:<8}  {:<16}  {:<12}  {:<7}  RUNTIME", "POD ID", "CREATED", "STATE", "NAME", "NAMESPACE", "ATTEMPT")?;
    for p in &list {
        let (name, ns, attempt) = p.metadata.as_ref().map_or(("", "", 0), |m| (m.name.as_str(), m.namespace.as_str(), m.attempt));
        let state = if p.state == cri::PodSandboxState::SandboxReady as i32 { "Ready" } else { "NotReady" };
        let handler = if p.runtime_handler.is_empty() { "(default)" } else { p.runtime_handler.as_str() };
        writeln!(
            out,
            "{:<13}  {:<16}  {:<8}  {:<16}  {:<12}  {:<7}  {handler}",
            trunc(&p.id, no_trunc),
            ago(p.created_at),
            state,
            name,
            ns,
            attempt
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

trait Title {
    fn to_ascii_title(&self) -> String;
}

impl Title for str {
    /// "RUNNING" -> "Running", as crictl's STATE column.
    fn to_ascii_title(&self) -> String {
        let lower = self.to_ascii_lowercase();
        let mut chars = lower.chars();
        chars.next().map(|f| f.to_ascii_uppercase().to_string() + chars.as_str()).unwrap_or_default()
    }
}

fn print_json(v: &serde_json::Value) -> Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, v)?;
    writeln!(out)?;
    Ok(())
}

async fn inspect_containers(c: &mut Client, args: &mut Args) -> Result<ExitCode> {
    for id in args.all("the container id")? {
        // crictl v1.32's wording.
        let r = c
            .container_status(cri::ContainerStatusRequest { container_id: id.clone(), verbose: true })
            .await
            .map_err(rpc)
            .context("get container status")
            .context("get the status of containers")?
            .into_inner();
        let status = r.status.with_context(|| format!("the runtime sent no status for container {id}"))?;
        print_json(&inspect::container(&status, &r.info))?;
    }
    Ok(ExitCode::SUCCESS)
}

async fn inspect_pods(c: &mut Client, args: &mut Args) -> Result<ExitCode> {
    for id in args.all("the pod id")? {
        // crictl v1.32's wording.
        let r = c
            .pod_sandbox_status(cri::PodSandboxStatusRequest { pod_sandbox_id: id.clone(), verbose: true })
            .await
            .map_err(rpc)
            .context("get pod sandbox status")
            .context("get the status of pod sandboxes")?
            .into_inner();
        let status = r.status.with_context(|| format!("the runtime sent no status for pod {id}"))?;
        print_json(&inspect::pod(&status, &r.info))?;
    }
    Ok(ExitCode::SUCCESS)
}

async fn stop(c: &mut Client, args: &mut Args) -> Result<ExitCode> {
    let mut timeout = 0i64;
    while let Some((opt, inline)) = args.next_option() {
        match opt.as_str() {
            "-t" | "--timeout" => {
                let v = args.value(&opt, inline)?;
                timeout = v.parse().with_context(|| format!("stop {opt} {v:?}: seconds expected"))?;
            }
            other => bail!("stop: unknown option {other}"),
        }
    }
    for id in args.all("the container id")? {
        // crictl v1.32's wording.
        c.stop_container(cri::StopContainerRequest { container_id: id.clone(), timeout })
            .await
            .map_err(rpc)
            .with_context(|| format!("stopping the container {}", q(&id)))?;
        println!("{id}");
    }
    Ok(ExitCode::SUCCESS)
}

/// `update`: UpdateContainerResources with the limits given (0, as in crictl,
/// leaves one as it is: containerd changes only the fields that are set).
async fn update(c: &mut Client, args: &mut Args) -> Result<ExitCode> {
    let mut linux = cri::LinuxContainerResources::default();
    while let Some((opt, inline)) = args.next_option() {
        let v = args.value(&opt, inline)?;
        let n = |what: &str| -> Result<i64> { v.parse().with_context(|| format!("update {opt} {v:?}: {what} expected")) };
        match opt.as_str() {
            "--memory" => linux.memory_limit_in_bytes = n("bytes")?,
            "--cpu-quota" => linux.cpu_quota = n("microseconds")?,
            "--cpu-period" => linux.cpu_period = n("microseconds")?,
            "--cpu-share" => linux.cpu_shares = n("a share count")?,
            other => bail!("update: unknown option {other}"),
        }
    }
    for id in args.all("the container id")? {
        let request = cri::UpdateContainerResourcesRequest { container_id: id.clone(), linux: Some(linux.clone()), ..Default::default() };
        // crictl v1.32's wording.
        c.update_container_resources(request).await.map_err(rpc).with_context(|| format!("updating container resources for {}", q(&id)))?;
        println!("{id}");
    }
    Ok(ExitCode::SUCCESS)
}

/// The options of `rm` and `rmp`: `-f`/`--force`, and for `rm` `-k`/`--keep-logs`.
fn rm_options(args: &mut Args, cmd: &str) -> Result<(bool, bool)> {
    let (mut force, mut keep_logs) = (false, false);
    while let Some((opt, _)) = args.next_option() {
        match opt.as_str() {
            "-f" | "--force" => force = true,
            "-k" | "--keep-logs" if cmd == "rm" => keep_logs = true,
            other => bail!("{cmd}: unknown option {other}"),
        }
    }
    Ok((force, keep_logs))
}

/// `rm`, as crictl v1.32: each container in turn (its errors together at the
/// end); a running one only with `-f` (stopped first); its log file and the
/// rotated ones (`PATH.*`) removed unless `-k`. The errors are crictl's words.
async fn rm(c: &mut Client, args: &mut Args) -> Result<ExitCode> {
    let (force, keep_logs) = rm_options(args, "rm")?;
    let mut errors = Vec::new();
    for id in args.all("the container id")? {
        if let Err(e) = rm_one(c, &id, force, keep_logs).await {
            errors.push(format!("{e:#}"));
        }
    }
    aggregate(errors)?;
    Ok(ExitCode::SUCCESS)
}

async fn rm_one(c: &mut Client, id: &str, force: bool, keep_logs: bool) -> Result<()> {
    let status = c
        .container_status(cri::ContainerStatusRequest { container_id: id.to_string(), verbose: false })
        .await
        .map_err(rpc)
        .with_context(|| format!("getting container status {}", q(id)))?
        .into_inner()
        .status
        .unwrap_or_default();
    if status.state == cri::ContainerState::ContainerRunning as i32 {
        if !force {
            bail!("container {} is running, please stop it first", q(id));
        }
        c.stop_container(cri::StopContainerRequest { container_id: id.to_string(), timeout: 0 })
            .await
            .map_err(rpc)
            .with_context(|| format!("stopping the container {}", q(id)))?;
        println!("{id}");
    }
    c.remove_container(cri::RemoveContainerRequest { container_id: id.to_string() })
        .await
        .map_err(rpc)
        .with_context(|| format!("removing container {}", q(id)))?;
    println!("{id}");
    if !keep_logs && !status.log_path.is_empty() {
        for file in log_files(Path::new(&status.log_path)) {
            if let Err(e) = std::fs::remove_file(&file) {
                let message = format!("removing log file {} for container {} failed: {e}", file.display(), q(id));
                eprintln!("{}", log_line(SystemTime::now(), "error", message.as_bytes()));
            }
        }
    }
    Ok(())
}

/// A container's log file and its rotations (`PATH.*`), as crictl's `rm` finds them.
fn log_files(path: &Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    if let (Some(dir), Some(name)) = (path.parent(), path.file_name().and_then(|n| n.to_str())) {
        let prefix = format!("{name}.");
        if let Ok(entries) = std::fs::read_dir(dir) {
            files.extend(
                entries
                    .filter_map(|e| e.ok())
                    .map(|e| e.path())
                    .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(&prefix))),
            );
        }
    }
    files.sort();
    files.push(path.to_path_buf());
    files
}

async fn stopp(c: &mut Client, args: &mut Args) -> Result<ExitCode> {
    for id in args.all("the pod id")? {
        // crictl v1.32's wording.
        c.stop_pod_sandbox(cri::StopPodSandboxRequest { pod_sandbox_id: id.clone() })
            .await
            .map_err(rpc)
            .with_context(|| format!("stopping the pod sandbox {}", q(&id)))?;
        println!("Stopped sandbox {id}");
    }
    Ok(ExitCode::SUCCESS)
}

/// `rmp`, as crictl v1.32: each pod in turn (its errors together at the end); a
/// ready one only with `-f` (stopped first). The errors are crictl's words.
async fn rmp(c: &mut Client, args: &mut Args) -> Result<ExitCode> {
    let (force, _) = rm_options(args, "rmp")?;
    let mut errors = Vec::new();
    for id in args.all("the pod id")? {
        if let Err(e) = rmp_one(c, &id, force).await {
            errors.push(format!("{e:#}"));
        }
    }
    aggregate(errors)?;
    Ok(ExitCode::SUCCESS)
}

async fn rmp_one(c: &mut Client, id: &str, force: bool) -> Result<()> {
    let status = c
        .pod_sandbox_status(cri::PodSandboxStatusRequest { pod_sandbox_id: id.to_string(), verbose: false })
        .await
        .map_err(rpc)
        .with_context(|| format!("getting sandbox status of pod {}", q(id)))?
        .into_inner();
    if status.status.is_some_and(|s| s.state == cri::PodSandboxState::SandboxReady as i32) {
        if !force {
            bail!("pod sandbox {} is running, please stop it first", q(id));
        }
        c.stop_pod_sandbox(cri::StopPodSandboxRequest { pod_sandbox_id: id.to_string() })
            .await
            .map_err(rpc)
            .with_context(|| format!("stopping the pod sandbox {} failed", q(id)))?;
        println!("Stopped sandbox {id}");
    }
    c.remove_pod_sandbox(cri::RemovePodSandboxRequest { pod_sandbox_id: id.to_string() })
        .await
        .map_err(rpc)
        .with_context(|| format!("removing the pod sandbox {}", q(id)))?;
    println!("Removed sandbox {id}");
    Ok(())
}

async fn version(c: &mut Client) -> Result<ExitCode> {
    // crictl v1.32's wording.
    let v = c.version(cri::VersionRequest { version: "v1".into() }).await.map_err(rpc).context("getting the runtime version")?.into_inner();
    println!(
        "Version:  {}\nRuntimeName:  {}\nRuntimeVersion:  {}\nRuntimeApiVersion:  {}",
        v.version, v.runtime_name, v.runtime_version, v.runtime_api_version
    );
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_crictls_syntax() {
        assert_eq!(parse_duration("300").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("300s").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("1.5h").unwrap(), Duration::from_secs(5400));
        assert!(parse_duration("5 minutes").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_duration("s").is_err());
    }

    #[test]
    fn options_take_separate_or_inline_values() {
        let mut a = Args { rest: ["--runtime=kata", "-r", "rune", "pod.json"].map(String::from).into() };
        assert_eq!(a.next_option(), Some(("--runtime".into(), Some("kata".into()))));
        let (opt, inline) = a.next_option().unwrap();
        assert_eq!(a.value(&opt, inline).unwrap(), "rune");
        assert_eq!(a.next_option(), None);
        assert_eq!(a.positional("file").unwrap(), "pod.json");
        assert!(a.positional("file").unwrap_err().to_string().contains("missing file"));
        // A command's own options end at its first operand.
        let mut a = Args { rest: ["-s", "c1", "sh", "-c", "exit 3"].map(String::from).into() };
        assert_eq!(a.next_option().unwrap().0, "-s");
        assert_eq!(a.positional("id").unwrap(), "c1");
        assert_eq!(a.all("cmd").unwrap(), ["sh", "-c", "exit 3"]);
        assert_eq!("RUNNING".to_ascii_title(), "Running");
    }

    #[test]
    fn a_failed_exec_reads_as_crictls() {
        let cmd = ["sh", "-c", "echo out; echo err >&2; exit 3"].map(String::from);
        let message = exec_sync_failure("c1", &cmd, 3, b"err\n");
        assert_eq!(
            message,
            b"execing command in container c1 synchronously: command 'sh -c echo out; echo err >&2; exit 3' exited with 3: err\n"
        );
        // What crictl v1.32 prints on stderr for it (its only output; exit status 1).
        let t = UNIX_EPOCH + Duration::from_secs(1_767_607_205);
        assert_eq!(
            fatal_line(t, &message),
            r#"time="2026-01-05T10:00:05Z" level=fatal msg="execing command in container c1 synchronously: command 'sh -c echo out; echo err >&2; exit 3' exited with 3: err\n""#
        );
        // stderr that is not UTF-8 stays as it came, for the quoting to escape.
        let message = exec_sync_failure("c1", &["false".into()], 1, b"\xff");
        assert!(fatal_line(t, &message).ends_with(r#"exited with 1: \xff""#));
        assert_eq!(
            ExecFailed(message).to_string(),
            "execing command in container c1 synchronously: command 'false' exited with 1: \u{fffd}"
        );
        assert_eq!(exec_stream_failure("c1", 3), "execing command in container c1: command terminated with exit code 3");
    }

    #[test]
    fn a_successful_exec_prints_both_streams_on_stdout() {
        assert_eq!(exec_sync_output(b"out\n", b"err\n"), b"out\n\nerr\n\n");
        assert_eq!(exec_sync_output(b"", b""), b"\n\n");
    }

    #[test]
    fn errors_of_several_ids_aggregate_as_k8s_does() {
        assert!(aggregate(vec![]).is_ok());
        assert_eq!(aggregate(vec!["a".into()]).unwrap_err().to_string(), "a");
        assert_eq!(aggregate(vec!["a".into(), "b".into(), "a".into()]).unwrap_err().to_string(), "[a, b]");
        assert_eq!(aggregate(vec!["a".into(), "a".into()]).unwrap_err().to_string(), "a");
        assert_eq!(q("4f2c"), r#""4f2c""#);
    }

    #[test]
    fn ages_read_as_crictls() {
        let cases = [
            (0, "Less than a second"),
            (1, "1 second"),
            (59, "59 seconds"),
            (60, "About a minute"),
            (119, "About a minute"),
            (120, "2 minutes"),
            (3599, "59 minutes"),
            (3600, "About an hour"),
            (5399, "About an hour"),
            (5400, "2 hours"),
            (47 * 3600, "47 hours"),
            (48 * 3600, "2 days"),
            (14 * 86_400, "2 weeks"),
            (60 * 86_400, "2 months"),
            (730 * 86_400, "2 years"),
        ];
        for (secs, text) in cases {
            assert_eq!(human_duration(secs), text, "{secs}s");
        }
        assert!(ago(0).ends_with(" years ago"));
    }

    #[test]
    fn rotated_logs_are_found_with_the_log() {
        let dir = std::env::temp_dir().join(format!("vfvm-crictl-logs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for name in ["c1.log", "c1.log.1", "c1.log.20260105-100000", "c1.logs", "c2.log"] {
            std::fs::write(dir.join(name), "").unwrap();
        }
        let found = log_files(&dir.join("c1.log"));
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(found, ["c1.log.1", "c1.log.20260105-100000", "c1.log"].map(|n| dir.join(n)));
    }
}
