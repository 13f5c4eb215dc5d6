//! The shim against an agent that misbehaves on purpose (#15 hole 4): a real ttrpc
//! server on a Unix socket, speaking the agent API as a compromised guest could.
//! Answers that carry nothing come back at once, in a loop; events name other pods'
//! containers or flood in faster than they are handled; replies are oversized. The
//! shim's stdio and event threads must stay paced (no spinning), hold a bounded number
//! of events at once, and pass nothing of another pod to containerd.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use containerd_shim::protos::ttrpc::{self, Code, TtrpcContext};
use vfvm_protocols::agent::{self as api, Agent, AgentClient};
use vfvm_protocols::client::{connect, AgentAddress, ConnectOptions};
use vfvm_shim::events::{self, EventSink, MAX_EVENTS_IN_FLIGHT};
use vfvm_shim::pacing::{IDLE_BURST, IDLE_PER_SEC};
use vfvm_shim::sandbox::{self, MAX_LISTED_PROCESSES};
use vfvm_shim::stdio::{self, CopierControl, OutStream, CHUNK};

/// How the double answers GetEvent.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Events {
    /// Nothing, at once, alternating with an OOM kill of another pod's container and
    /// the exit of a process nobody runs.
    NothingOrForeign,
    /// An exit of this pod's container, at once, every time.
    ExitFlood,
    /// An error that ends the stream.
    Broken,
}

/// How the double answers ReadStdout.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Reads {
    /// No data, not at the end, at once.
    NothingAtOnce,
    /// Twice what was asked for.
    Oversized,
}

struct Double {
    events: Mutex<Events>,
    reads: Reads,
    pids: usize,
    /// GetEvent/ReadStdout calls so far, signalled on each.
    calls: Mutex<u64>,
    called: Condvar,
}

impl Double {
    fn count(&self) {
        *self.calls.lock().unwrap() += 1;
        self.called.notify_all();
    }

    /// Waits until `n` calls have come (bounded: the test fails rather than hangs).
    fn wait_calls(&self, n: u64, bound: Duration) -> Result<u64, u64> {
        let calls = self.calls.lock().unwrap();
        let (calls, timeout) = self.called.wait_timeout_while(calls, bound, |c| *c < n).unwrap();
        if timeout.timed_out() {
            Err(*calls)
        } else {
            Ok(*calls)
        }
    }

    fn calls(&self) -> u64 {
        *self.calls.lock().unwrap()
    }
}

/// The double as the ttrpc server serves it.
struct Served(Arc<Double>);

impl Agent for Served {
    fn get_event(&self, _ctx: &TtrpcContext, _req: api::GetEventRequest) -> ttrpc::Result<api::GetEventResponse> {
        let n = {
            let mut c = self.0.calls.lock().unwrap();
            *c += 1;
            *c
        };
        self.0.called.notify_all();
        let mut r = api::GetEventResponse::new();
        match *self.0.events.lock().unwrap() {
            Events::NothingOrForeign => match n % 3 {
                0 => {}
                1 => r.set_oom(api::OomKilled { container_id: "another-pods-container".into(), ..Default::default() }),
                _ => r.set_exited(api::ProcessExited {
                    container_id: "x".repeat(100_000),
                    exec_id: "nobody".into(),
                    exit_status: 1,
                    ..Default::default()
                }),
            },
            Events::ExitFlood => {
                r.set_exited(api::ProcessExited { container_id: "c1".into(), exit_status: 0, ..Default::default() });
            }
            Events::Broken => return Err(ttrpc::Error::RpcStatus(ttrpc::get_status(Code::INTERNAL, "broken on purpose"))),
        }
        Ok(r)
    }

    fn read_stdout(&self, _ctx: &TtrpcContext, req: api::ReadStreamRequest) -> ttrpc::Result<api::ReadStreamResponse> {
        self.0.count();
        let mut r = api::ReadStreamResponse::new();
        if self.0.reads == Reads::Oversized {
            r.data = vec![b'x'; 2 * req.max_len as usize];
        }
        Ok(r)
    }

    fn list_processes(&self, _ctx: &TtrpcContext, _req: api::ListProcessesRequest) -> ttrpc::Result<api::ListProcessesResponse> {
        let mut r = api::ListProcessesResponse::new();
        r.pids = (1..=u32::try_from(self.0.pids).unwrap()).collect();
        Ok(r)
    }
}

struct Agentd {
    _server: ttrpc::Server,
    double: Arc<Double>,
    client: Arc<AgentClient>,
    dir: PathBuf,
}

fn agent(name: &str, events: Events, reads: Reads, pids: usize) -> Agentd {
    let dir = std::env::temp_dir().join(format!("vfvm-misbehaving-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("agent.sock");
    let double = Arc::new(Double { events: Mutex::new(events), reads, pids, calls: Mutex::new(0), called: Condvar::new() });
    let mut server = ttrpc::Server::new()
        .bind(&format!("unix://{}", sock.display()))
        .unwrap()
        .register_service(api::create_agent(Arc::new(Served(double.clone()))));
    server.start().unwrap();
    let client = Arc::new(connect(&AgentAddress::Unix(sock), ConnectOptions::default()).unwrap());
    Agentd { _server: server, double, client, dir }
}

/// The least time `n` empty answers can take once the burst is spent.
fn paced_minimum(n: u64) -> Duration {
    let beyond = n.saturating_sub(u64::from(IDLE_BURST)).saturating_sub(1);
    Duration::from_secs_f64(beyond as f64 / f64::from(IDLE_PER_SEC))
}

/// CPU time this process has used (user + system).
fn cpu_time() -> Duration {
    let mut u = std::mem::MaybeUninit::<libc::rusage>::uninit();
    // SAFETY: getrusage writes a whole rusage into the buffer it is given.
    assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_SELF, u.as_mut_ptr()) }, 0);
    // SAFETY: initialised by the successful call above.
    let u = unsafe { u.assume_init() };
    let tv = |t: libc::timeval| {
        Duration::from_secs(u64::try_from(t.tv_sec).unwrap_or(0)) + Duration::from_micros(u64::try_from(t.tv_usec).unwrap_or(0))
    };
    tv(u.ru_utime) + tv(u.ru_stime)
}

#[test]
fn a_stdio_copier_is_paced_when_reads_come_back_empty_at_once() {
    let a = agent("reads", Events::Broken, Reads::NothingAtOnce, 0);
    let (done_tx, done) = mpsc::channel();
    let abandon = Arc::new(AtomicBool::new(false));
    let target = format!("file://{}", a.dir.join("out.log").display());
    let (started, cpu0) = (Instant::now(), cpu_time());
    stdio::spawn_output(
        a.client.clone(),
        "c1".into(),
        String::new(),
        OutStream::Stdout,
        target,
        CopierControl { done: done_tx, abandon: abandon.clone() },
        "pod".into(),
    )
    .expect("the copier thread starts");
    let n = u64::from(IDLE_BURST) + 8;
    let got = a.double.wait_calls(n, Duration::from_secs(30)).unwrap_or_else(|c| panic!("only {c} reads in 30 s"));
    let (took, cpu) = (started.elapsed(), cpu_time() - cpu0);
    // Unpaced, these reads take a few milliseconds of a busy thread.
    assert!(took >= paced_minimum(got), "{got} empty reads in {took:?}: not paced to {IDLE_PER_SEC} a second");
    assert!(cpu < took / 2, "{cpu:?} of CPU in {took:?} of pacing");
    abandon.store(true, Ordering::SeqCst);
    done.recv_timeout(Duration::from_secs(10)).expect("the copier stops when told, even paced");
    println!("{got} empty reads took {took:?} and {cpu:?} of CPU (burst {IDLE_BURST}, then {IDLE_PER_SEC}/s)");
}

#[test]
fn an_oversized_read_answer_stops_the_copier_and_writes_nothing() {
    let a = agent("oversized", Events::Broken, Reads::Oversized, 0);
    let (done_tx, done) = mpsc::channel();
    let out = a.dir.join("out.log");
    stdio::spawn_output(
        a.client.clone(),
        "c1".into(),
        String::new(),
        OutStream::Stdout,
        format!("file://{}", out.display()),
        CopierControl { done: done_tx, abandon: Arc::new(AtomicBool::new(false)) },
        "pod".into(),
    )
    .expect("the copier thread starts");
    done.recv_timeout(Duration::from_secs(10)).expect("the copier stops on an answer past its read size");
    assert_eq!(a.double.calls(), 1);
    let written = std::fs::metadata(&out).map(|m| m.len()).unwrap_or(0);
    assert_eq!(written, 0, "{} bytes of a {}-byte answer to a {CHUNK}-byte read reached the log", written, 2 * CHUNK);
}

/// This pod, as the event stream's consumer sees it: one running container "c1".
#[derive(Default)]
struct Pod {
    exits: AtomicUsize,
    ooms: Mutex<Vec<String>>,
    in_flight: AtomicUsize,
    most_in_flight: AtomicUsize,
    /// Exit handlers hold until this is set (as a real one waits for output to drain).
    release: tokio::sync::Notify,
    released: AtomicBool,
    ended: Mutex<Option<mpsc::Sender<String>>>,
    in_flight_changed: (Mutex<()>, Condvar),
}

impl Pod {
    /// The pod, and where its end of stream is said.
    fn new() -> (Arc<Pod>, mpsc::Receiver<String>) {
        let (tx, rx) = mpsc::channel();
        let pod = Pod { ended: Mutex::new(Some(tx)), ..Default::default() };
        (Arc::new(pod), rx)
    }
}

#[async_trait]
impl EventSink for Pod {
    fn is_running(&self, container_id: &str, exec_id: &str) -> bool {
        container_id == "c1" && exec_id.is_empty()
    }

    fn has_container(&self, container_id: &str) -> bool {
        container_id == "c1"
    }

    async fn exited(&self, _container_id: String, _exec_id: String, _exit_status: u32, _at: u64) {
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.most_in_flight.fetch_max(now, Ordering::SeqCst);
        {
            // Under the lock, so a waiter between its check and its wait is not missed.
            let _g = self.in_flight_changed.0.lock().unwrap();
            self.in_flight_changed.1.notify_all();
        }
        while !self.released.load(Ordering::SeqCst) {
            let released = self.release.notified();
            if self.released.load(Ordering::SeqCst) {
                break;
            }
            released.await;
        }
        self.exits.fetch_add(1, Ordering::SeqCst);
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
    }

    async fn oom_killed(&self, container_id: String) {
        self.ooms.lock().unwrap().push(container_id);
    }

    async fn stream_ended(&self, reason: String) {
        if let Some(tx) = self.ended.lock().unwrap().take() {
            let _ = tx.send(reason);
        }
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

#[test]
fn get_event_answering_nothing_or_other_pods_events_at_once_is_paced_and_dropped() {
    let a = agent("events", Events::NothingOrForeign, Reads::NothingAtOnce, 0);
    let rt = runtime();
    let (pod, ended) = Pod::new();
    let (started, cpu0) = (Instant::now(), cpu_time());
    let follower = events::follow(a.client.clone(), pod.clone(), rt.handle().clone(), "pod".into()).unwrap();
    let n = u64::from(IDLE_BURST) + 8;
    let got = a.double.wait_calls(n, Duration::from_secs(30)).unwrap_or_else(|c| panic!("only {c} GetEvents in 30 s"));
    let (took, cpu) = (started.elapsed(), cpu_time() - cpu0);
    assert!(took >= paced_minimum(got), "{got} GetEvents with nothing for this pod in {took:?}: not paced");
    assert!(cpu < took / 2, "{cpu:?} of CPU in {took:?} of pacing");
    // Ends the stream; the follower says so and stops.
    *a.double.events.lock().unwrap() = Events::Broken;
    follower.join().unwrap();
    assert_eq!(ended.recv_timeout(Duration::from_secs(10)).as_deref(), Ok("broken on purpose"));
    assert!(pod.ooms.lock().unwrap().is_empty(), "another pod's OOM kill passed on: {:?}", pod.ooms.lock().unwrap());
    assert_eq!(pod.exits.load(Ordering::SeqCst), 0, "an exit of a process nobody runs passed on");
    println!("{got} GetEvents (nothing, foreign OOM kills, unknown exits) took {took:?} and {cpu:?} of CPU; none passed on");
}

#[test]
fn a_flood_of_exit_events_is_handled_at_most_so_many_at_once() {
    let a = agent("flood", Events::ExitFlood, Reads::NothingAtOnce, 0);
    let rt = runtime();
    let (pod, ended) = Pod::new();
    let follower = events::follow(a.client.clone(), pod.clone(), rt.handle().clone(), "pod".into()).unwrap();
    let limit = MAX_EVENTS_IN_FLIGHT;
    {
        let (lock, cv) = &pod.in_flight_changed;
        let guard = lock.lock().unwrap();
        let (_g, t) = cv.wait_timeout_while(guard, Duration::from_secs(30), |_| pod.in_flight.load(Ordering::SeqCst) < limit).unwrap();
        assert!(!t.timed_out(), "only {} exit handlers running after 30 s", pod.in_flight.load(Ordering::SeqCst));
    }
    // The follower took one more event and waits for a handler to finish: the guest
    // holds the rest. (A bounded look for a call that must not come.)
    let held = a.double.wait_calls(limit as u64 + 2, Duration::from_millis(500));
    assert!(held.is_err(), "{:?} GetEvents while {limit} exits were being handled", held);
    assert_eq!(pod.most_in_flight.load(Ordering::SeqCst), limit);
    // Released, the handlers finish and the follower goes on.
    pod.released.store(true, Ordering::SeqCst);
    pod.release.notify_waiters();
    a.double.wait_calls(limit as u64 + 100, Duration::from_secs(30)).expect("the follower goes on once handlers finish");
    *a.double.events.lock().unwrap() = Events::Broken;
    follower.join().unwrap();
    assert_eq!(ended.recv_timeout(Duration::from_secs(10)).as_deref(), Ok("broken on purpose"));
    assert!(pod.most_in_flight.load(Ordering::SeqCst) <= limit, "{} handlers at once", pod.most_in_flight.load(Ordering::SeqCst));
    println!(
        "exit flood: at most {} handled at once, {} handled",
        pod.most_in_flight.load(Ordering::SeqCst),
        pod.exits.load(Ordering::SeqCst)
    );
}

#[test]
fn a_listing_of_more_processes_than_a_vm_runs_is_refused() {
    let a = agent("pids", Events::Broken, Reads::NothingAtOnce, 1_000_000);
    let err = match sandbox::list_processes(&a.client, "c1") {
        Ok(p) => panic!("a listing of {} pids was taken", p.len()),
        Err(e) => sandbox::agent_message(&e),
    };
    assert!(err.contains("1000000 processes in container c1") && err.contains(&MAX_LISTED_PROCESSES.to_string()), "{err}");
    let fine = agent("pids-fine", Events::Broken, Reads::NothingAtOnce, 3);
    assert_eq!(sandbox::list_processes(&fine.client, "c1").unwrap(), vec![1, 2, 3]);
}

#[test]
fn an_agents_error_message_is_cut_to_a_bound() {
    let huge = ttrpc::Error::RpcStatus(ttrpc::get_status(Code::INTERNAL, "é".repeat(50_000)));
    let m = sandbox::agent_message(&huge);
    assert!(
        m.len() <= sandbox::MAX_AGENT_MESSAGE + 40 && m.ends_with("(100000 bytes in all)"),
        "{} bytes: {}",
        m.len(),
        &m[m.len() - 40..]
    );
    let small = ttrpc::Error::RpcStatus(ttrpc::get_status(Code::INTERNAL, "no such container"));
    assert_eq!(sandbox::agent_message(&small), "no such container");
}
