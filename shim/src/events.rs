//! The agent's event stream (process exits, OOM kills), followed by one thread per pod.
//!
//! The guest is untrusted, so the stream is too: an event about a process this pod does
//! not run (an OOM kill "of" another pod's container, an exit of an unknown or already
//! ended process) is dropped and never reaches containerd; answers that carry nothing
//! are paced ([`IdlePacer`]); and at most [`MAX_EVENTS_IN_FLIGHT`] events are handled at
//! once, so a flood of events queues in the guest instead of in the shim's memory.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use async_trait::async_trait;
use containerd_shim::protos::ttrpc::{self, Code};
use tokio::runtime::Handle;
use tokio::sync::Semaphore;
use vfvm_protocols::agent::{self as api, AgentClient};

use crate::pacing::IdlePacer;
use crate::sandbox;

/// How long one GetEvent waits in the guest.
pub const EVENT_WAIT_MS: u32 = 2000;
/// Events being handled at once (an exit waits up to the drain bound for its output).
pub const MAX_EVENTS_IN_FLIGHT: usize = 64;

/// What the shim does with the pod's events (the task service).
#[async_trait]
pub trait EventSink: Send + Sync + 'static {
    /// Whether (`container_id`, `exec_id`) is a process of this pod that has not exited.
    fn is_running(&self, container_id: &str, exec_id: &str) -> bool;
    /// Whether `container_id` is one of this pod's containers.
    fn has_container(&self, container_id: &str) -> bool;
    async fn exited(&self, container_id: String, exec_id: String, exit_status: u32, exited_at_unix_nanos: u64);
    async fn oom_killed(&self, container_id: String);
    /// The event stream ended: the VM is gone (`reason` in the agent's words, bounded).
    async fn stream_ended(&self, reason: String);
}

/// What one answer of GetEvent is to the shim.
enum Answer {
    Exited(api::ProcessExited),
    Oom(String),
    /// Nothing to act on: the wait ended, or the event is not this pod's to report.
    Nothing {
        dropped: Option<String>,
    },
    Ended(String),
}

fn classify(sink: &dyn EventSink, answer: ttrpc::Result<api::GetEventResponse>) -> Answer {
    match answer {
        Ok(ev) if ev.has_exited() => {
            let e = ev.exited();
            if sink.is_running(&e.container_id, &e.exec_id) {
                Answer::Exited(e.clone())
            } else {
                Answer::Nothing {
                    dropped: Some(format!("an exit of {}, not a running process of this pod", bounded_id(&e.container_id, &e.exec_id))),
                }
            }
        }
        Ok(ev) if ev.has_oom() => {
            let id = &ev.oom().container_id;
            if sink.has_container(id) {
                Answer::Oom(id.clone())
            } else {
                Answer::Nothing { dropped: Some(format!("an OOM kill of {}, not a container of this pod", bounded_id(id, ""))) }
            }
        }
        Ok(_) => Answer::Nothing { dropped: None },
        Err(ttrpc::Error::RpcStatus(s)) if s.code() == Code::DEADLINE_EXCEEDED || s.code() == Code::NOT_FOUND => {
            Answer::Nothing { dropped: None }
        }
        Err(e) => Answer::Ended(sandbox::agent_message(&e)),
    }
}

/// An id from the guest, fit for a log line.
fn bounded_id(container_id: &str, exec_id: &str) -> String {
    let id = if exec_id.is_empty() { container_id.to_string() } else { format!("{container_id}/{exec_id}") };
    sandbox::bounded_text(&id, 128)
}

/// Follows the agent's events on a thread of its own until the stream ends; each event
/// is handled on `runtime`, at most [`MAX_EVENTS_IN_FLIGHT`] at once.
pub fn follow<S: EventSink>(agent: Arc<AgentClient>, sink: Arc<S>, runtime: Handle, log_id: String) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new().name("vfvm-events".into()).spawn(move || {
        let in_flight = Arc::new(Semaphore::new(MAX_EVENTS_IN_FLIGHT));
        let mut pacer = IdlePacer::new(Instant::now());
        let mut dropped = 0u64;
        loop {
            let mut req = api::GetEventRequest::new();
            req.timeout_ms = EVENT_WAIT_MS;
            // Blocks while the limit is reached: the guest holds the rest.
            let admit = || runtime.block_on(in_flight.clone().acquire_owned()).ok();
            match classify(sink.as_ref(), agent.get_event(sandbox::ctx(), &req)) {
                Answer::Exited(e) => {
                    let Some(permit) = admit() else { return };
                    let sink = sink.clone();
                    runtime.spawn(async move {
                        let status = u32::try_from(e.exit_status).unwrap_or(0);
                        sink.exited(e.container_id, e.exec_id, status, e.exited_at_unix_nanos).await;
                        drop(permit);
                    });
                }
                Answer::Oom(id) => {
                    let Some(permit) = admit() else { return };
                    let sink = sink.clone();
                    runtime.spawn(async move {
                        sink.oom_killed(id).await;
                        drop(permit);
                    });
                }
                Answer::Nothing { dropped: what } => {
                    if let Some(what) = what {
                        dropped += 1;
                        // The first, then every 1000th: the guest decides how many there are.
                        if dropped == 1 || dropped % 1000 == 0 {
                            tracing::info!(sandbox = %log_id, "the agent sent {what}: dropped ({dropped} such events so far)");
                        }
                    }
                    if pacer.idle() {
                        tracing::warn!(
                            sandbox = %log_id,
                            "the agent answers GetEvent with nothing to act on, again and again without waiting: paced to {} a second",
                            crate::pacing::IDLE_PER_SEC
                        );
                    }
                }
                Answer::Ended(reason) => {
                    tracing::info!(sandbox = %log_id, "agent event stream ended: {reason}");
                    let sink = sink.clone();
                    runtime.spawn(async move { sink.stream_ended(reason).await });
                    return;
                }
            }
        }
    })
}
