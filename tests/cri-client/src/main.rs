//! `vfvm-crictl`: crictl's command line for the CRI calls the project's tests
//! make. Usage: `vfvm-crictl --help`.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use k8s_cri::v1 as cri;
use vfvm_crictl::client::{self, status_message, Client};
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
                                                        run a command in a container (ExecSync);
                                                        exits with the command's exit code
  logs CONTAINER                                        print a container's log
  ps [-a] [-q] [--pod|-p POD] [--id ID] [--state STATE] [--name NAME] [--no-trunc]
                                                        list containers (running only without -a)
  pods [-q] [--id ID] [--state ready|notready] [--name NAME] [--no-trunc]
                                                        list pod sandboxes
  inspect CONTAINER...  |  inspectp POD...              status and runtime info, as JSON
  stop [-t|--timeout SECS] CONTAINER...  |  rm [-f] CONTAINER...
  stopp POD...  |  rmp [-f] POD...
  version";

/// VMs boot slowly in the lab (L3 under emulated SVM): a generous default.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);
const DEFAULT_ENDPOINT: &str = "unix:///run/containerd/containerd.sock";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("vfvm-crictl: {e:#}");
            ExitCode::FAILURE
        }
    }
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
            other => bail!("unknown global option {other}\n\n{USAGE}"),
        }
    }
    let command = args.positional("a command")?;
    if command == "help" {
        println!("{USAGE}");
        return Ok(ExitCode::SUCCESS);
    }
    let endpoint = endpoint.unwrap_or_else(|| DEFAULT_ENDPOINT.to_string());
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the async runtime")?;
    rt.block_on(async move {
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
            "version" => version(c).await,
            other => bail!("unknown command {other:?}\n\n{USAGE}"),
        }
        .with_context(|| format!("{command} (runtime endpoint {endpoint})"))
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
    let config = config::load_pod_config(Path::new(&file))?;
    let resp = c.run_pod_sandbox(cri::RunPodSandboxRequest { config: Some(config), runtime_handler: handler }).await.map_err(rpc)?;
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
    let config = config::load_container_config(Path::new(&container_file))?;
    let sandbox_config = config::load_pod_config(Path::new(&pod_file))?;
    let resp = c
        .create_container(cri::CreateContainerRequest { pod_sandbox_id: pod, config: Some(config), sandbox_config: Some(sandbox_config) })
        .await
        .map_err(rpc)?;
    println!("{}", resp.into_inner().container_id);
    Ok(ExitCode::SUCCESS)
}

async fn start(c: &mut Client, args: &mut Args) -> Result<ExitCode> {
    for id in args.all("the container id")? {
        c.start_container(cri::StartContainerRequest { container_id: id.clone() })
            .await
            .map_err(rpc)
            .with_context(|| format!("starting container {id}"))?;
        println!("{id}");
    }
    Ok(ExitCode::SUCCESS)
}

async fn exec(c: &mut Client, args: &mut Args) -> Result<ExitCode> {
    let mut timeout = 0i64;
    while let Some((opt, inline)) = args.next_option() {
        match opt.as_str() {
            // Every exec is synchronous here (ExecSync): no streaming server needed.
            "-s" | "--sync" => {}
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
    let resp = c
        .exec_sync(cri::ExecSyncRequest { container_id: id.clone(), cmd, timeout })
        .await
        .map_err(rpc)
        .with_context(|| format!("exec in container {id}"))?
        .into_inner();
    std::io::stdout().write_all(&resp.stdout)?;
    std::io::stderr().write_all(&resp.stderr)?;
    std::io::stdout().flush()?;
    Ok(exit_code(resp.exit_code))
}

fn exit_code(code: i32) -> ExitCode {
    ExitCode::from(u8::try_from(code).unwrap_or(255))
}

async fn container_logs(c: &mut Client, args: &mut Args) -> Result<ExitCode> {
    let id = args.positional("the container id")?;
    args.done()?;
    let status =
        c.container_status(cri::ContainerStatusRequest { container_id: id.clone(), verbose: false }).await.map_err(rpc)?.into_inner();
    let path = status.status.map(|s| s.log_path).unwrap_or_default();
    if path.is_empty() {
        bail!("container {id} has no log path (its config set no log_path, or its pod no log_directory)");
    }
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading the log of container {id} at {path}"))?;
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

/// "12s ago", as crictl's CREATED column (roughly).
fn ago(nanos: i64) -> String {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as i64);
    let secs = (now - nanos).max(0) / 1_000_000_000;
    match secs {
        s if s < 60 => format!("{s} seconds ago"),
        s if s < 3600 => format!("{} minutes ago", s / 60),
        s => format!("{} hours ago", s / 3600),
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
    let mut list = c.list_containers(cri::ListContainersRequest { filter: Some(filter) }).await.map_err(rpc)?.into_inner().containers;
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
    let mut list = c.list_pod_sandbox(cri::ListPodSandboxRequest { filter: Some(filter) }).await.map_err(rpc)?.into_inner().items;
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
        let r = c
            .container_status(cri::ContainerStatusRequest { container_id: id.clone(), verbose: true })
            .await
            .map_err(rpc)
            .with_context(|| format!("container {id}"))?
            .into_inner();
        let status = r.status.with_context(|| format!("the runtime sent no status for container {id}"))?;
        print_json(&inspect::container(&status, &r.info))?;
    }
    Ok(ExitCode::SUCCESS)
}

async fn inspect_pods(c: &mut Client, args: &mut Args) -> Result<ExitCode> {
    for id in args.all("the pod id")? {
        let r = c
            .pod_sandbox_status(cri::PodSandboxStatusRequest { pod_sandbox_id: id.clone(), verbose: true })
            .await
            .map_err(rpc)
            .with_context(|| format!("pod {id}"))?
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
        c.stop_container(cri::StopContainerRequest { container_id: id.clone(), timeout })
            .await
            .map_err(rpc)
            .with_context(|| format!("stopping container {id}"))?;
        println!("{id}");
    }
    Ok(ExitCode::SUCCESS)
}

/// The options of `rm` and `rmp`: only `-f`/`--force`.
fn force_option(args: &mut Args, cmd: &str) -> Result<bool> {
    let mut force = false;
    while let Some((opt, _)) = args.next_option() {
        match opt.as_str() {
            "-f" | "--force" => force = true,
            other => bail!("{cmd}: unknown option {other}"),
        }
    }
    Ok(force)
}

async fn rm(c: &mut Client, args: &mut Args) -> Result<ExitCode> {
    let force = force_option(args, "rm")?;
    for id in args.all("the container id")? {
        if force {
            c.stop_container(cri::StopContainerRequest { container_id: id.clone(), timeout: 0 })
                .await
                .map_err(rpc)
                .with_context(|| format!("stopping container {id}"))?;
        }
        c.remove_container(cri::RemoveContainerRequest { container_id: id.clone() })
            .await
            .map_err(rpc)
            .with_context(|| format!("removing container {id}"))?;
        println!("{id}");
    }
    Ok(ExitCode::SUCCESS)
}

async fn stopp(c: &mut Client, args: &mut Args) -> Result<ExitCode> {
    for id in args.all("the pod id")? {
        c.stop_pod_sandbox(cri::StopPodSandboxRequest { pod_sandbox_id: id.clone() })
            .await
            .map_err(rpc)
            .with_context(|| format!("stopping pod {id}"))?;
        println!("Stopped sandbox {id}");
    }
    Ok(ExitCode::SUCCESS)
}

async fn rmp(c: &mut Client, args: &mut Args) -> Result<ExitCode> {
    let force = force_option(args, "rmp")?;
    for id in args.all("the pod id")? {
        if force {
            c.stop_pod_sandbox(cri::StopPodSandboxRequest { pod_sandbox_id: id.clone() })
                .await
                .map_err(rpc)
                .with_context(|| format!("stopping pod {id}"))?;
        }
        c.remove_pod_sandbox(cri::RemovePodSandboxRequest { pod_sandbox_id: id.clone() })
            .await
            .map_err(rpc)
            .with_context(|| format!("removing pod {id}"))?;
        println!("Removed sandbox {id}");
    }
    Ok(ExitCode::SUCCESS)
}

async fn version(c: &mut Client) -> Result<ExitCode> {
    let v = c.version(cri::VersionRequest { version: "v1".into() }).await.map_err(rpc)?.into_inner();
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
}
