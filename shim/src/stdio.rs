//! A process's stdio as containerd hands it over (FIFO paths, or `file://` log
//! URIs), streamed to and from the agent's ReadStdout/ReadStderr/WriteStdin.
//! Each stream is one blocking thread with the (blocking) agent client.

use std::io::{Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use vfvm_protocols::agent::{self as api, AgentClient};

use crate::pacing::{IdlePacer, IDLE_PER_SEC};
use crate::sandbox::ctx;

/// What one agent read asks for (an answer with more breaks the protocol), and how
/// long it may wait for data.
pub const CHUNK: u32 = 64 * 1024;
const READ_WAIT_MS: u32 = 1000;

#[derive(Clone, Debug, Default)]
pub struct StdioPaths {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutStream {
    Stdout,
    Stderr,
}

/// Opens an output destination: a FIFO containerd reads, or a `file://` log.
fn open_output(target: &str) -> std::io::Result<std::fs::File> {
    if let Some(path) = target.strip_prefix("file://") {
        return std::fs::OpenOptions::new().create(true).append(true).open(path);
    }
    if target.contains("://") {
        return Err(std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            format!("stdio URI {target:?}: only FIFO paths and file:// are supported"),
        ));
    }
    std::fs::OpenOptions::new().write(true).open(target)
}

/// Checks the stdio targets before anything starts, so a bad one is a clear error.
pub fn validate(paths: &StdioPaths) -> Result<(), String> {
    for t in [&paths.stdout, &paths.stderr, &paths.stdin] {
        if t.contains("://") && !t.starts_with("file://") {
            return Err(format!("stdio URI {t:?}: only FIFO paths and file:// are supported"));
        }
    }
    Ok(())
}

/// How an output copier reports that it stopped, and is told to stop.
#[derive(Clone)]
pub struct CopierControl {
    /// Signalled when the copier stops, whatever the reason.
    pub done: mpsc::Sender<()>,
    /// Set once the process's exit has been reported and the output did not end.
    pub abandon: Arc<AtomicBool>,
}

/// Copies one output stream of (`container`, `exec`) until the agent reports its
/// end, or until `control.abandon` is set (checked at least every `READ_WAIT_MS`):
/// a child the process left behind can hold the stream open for ever, and
/// containerd's reader (an attached `ctr task exec`) waits for the FIFO to close.
pub fn spawn_output(
    agent: Arc<AgentClient>,
    container: String,
    exec: String,
    stream: OutStream,
    target: String,
    control: CopierControl,
    log_id: String,
) -> Option<JoinHandle<()>> {
    if target.is_empty() {
        return None;
    }
    let name = format!("{container}/{exec}/{stream:?}");
    std::thread::Builder::new()
        .name("vfvm-stdio-out".into())
        .spawn(move || {
            let mut out = match open_output(&target) {
                Ok(f) => Some(f),
                Err(e) => {
                    tracing::warn!(sandbox = %log_id, "{name}: opening {target}: {e}; the output is dropped");
                    None
                }
            };
            let mut pacer = IdlePacer::new(Instant::now());
            loop {
                let mut req = api::ReadStreamRequest::new();
                req.container_id = container.clone();
                req.exec_id = exec.clone();
                req.max_len = CHUNK;
                req.wait_ms = READ_WAIT_MS;
                let r = match stream {
                    OutStream::Stdout => agent.read_stdout(ctx(), &req),
                    OutStream::Stderr => agent.read_stderr(ctx(), &req),
                };
                match r {
                    Ok(resp) if resp.data.len() > CHUNK as usize => {
                        // The guest broke the protocol: its output is not trusted further.
                        tracing::warn!(
                            sandbox = %log_id,
                            "{name}: the agent answered a read of at most {CHUNK} bytes with {}; the rest of the output is dropped",
                            resp.data.len()
                        );
                        break;
                    }
                    Ok(resp) => {
                        if resp.data.is_empty() && !resp.eof && pacer.idle() {
                            tracing::warn!(
                                sandbox = %log_id,
                                "{name}: the agent answers reads with nothing, again and again without waiting: paced to {IDLE_PER_SEC} a second"
                            );
                        }
                        if let Some(f) = out.as_mut() {
                            if !resp.data.is_empty() && f.write_all(&resp.data).is_err() {
                                // The reader went away (containerd closed the FIFO): keep draining.
                                out = None;
                            }
                        }
                        if resp.eof {
                            break;
                        }
                        if control.abandon.load(Ordering::SeqCst) {
                            tracing::info!(sandbox = %log_id, "{name}: still open after the process's exit was reported; closing it");
                            break;
                        }
                    }
                    Err(e) => {
                        tracing::debug!(sandbox = %log_id, "{name}: {}", crate::sandbox::agent_message(&e));
                        break;
                    }
                }
            }
            let _ = control.done.send(());
        })
        .ok()
}

/// Copies containerd's stdin FIFO into the process until it closes, then closes
/// the process's stdin. The FIFO's open blocks until containerd opens its end;
/// [`release_stdin`] unblocks it when the process ends first.
pub fn spawn_input(agent: Arc<AgentClient>, container: String, exec: String, source: String, log_id: String) -> Option<JoinHandle<()>> {
    if source.is_empty() {
        return None;
    }
    std::thread::Builder::new()
        .name("vfvm-stdio-in".into())
        .spawn(move || {
            let mut f = match std::fs::File::open(&source) {
                Ok(f) => f,
                Err(e) => {
                    tracing::warn!(sandbox = %log_id, "stdin {source}: {e}");
                    return;
                }
            };
            let mut buf = vec![0u8; CHUNK as usize];
            loop {
                let n = match f.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let mut req = api::WriteStreamRequest::new();
                req.container_id = container.clone();
                req.exec_id = exec.clone();
                req.data = buf[..n].to_vec();
                if agent.write_stdin(ctx(), &req).is_err() {
                    break;
                }
            }
            let mut req = api::CloseStdinRequest::new();
            req.container_id = container;
            req.exec_id = exec;
            let _ = agent.close_stdin(ctx(), &req);
        })
        .ok()
}

/// Opens the writing end of a stdin FIFO without blocking and closes it: a
/// reader blocked in open() then wakes and sees end-of-file.
pub fn release_stdin(source: &str) {
    if source.is_empty() || source.contains("://") {
        return;
    }
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::OpenOptions::new().write(true).custom_flags(libc::O_NONBLOCK).open(Path::new(source));
}
