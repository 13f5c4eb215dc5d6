//! The agent client against a real ttrpc server, over a Unix socket, over hybrid
//! vsock (through a peer that bridges the stream after the handshake, as a VMM
//! does), and over AF_VSOCK inside the lab.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vfvm_protocols::agent::{self, Agent, HealthRequest, HealthResponse};
use vfvm_protocols::client::{connect, AgentAddress, ClientError, ConnectOptions};

struct TestAgent;

impl Agent for TestAgent {
    fn health(&self, _ctx: &ttrpc::TtrpcContext, _req: HealthRequest) -> ttrpc::Result<HealthResponse> {
        let mut r = HealthResponse::new();
        r.agent_version = "test-agent".into();
        r.api_version = agent::API_VERSION.into();
        Ok(r)
    }
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vfvm-proto-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn serve(sockaddr: &str) -> ttrpc::Server {
    let mut server = ttrpc::Server::new().bind(sockaddr).unwrap().register_service(agent::create_agent(Arc::new(TestAgent)));
    server.start().unwrap();
    server
}

fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(i64::try_from(Duration::from_secs(5).as_nanos()).expect("5 s in nanoseconds fits an i64"))
}

/// The error of a connect that must fail (AgentClient has no Debug for unwrap_err).
fn fails(r: Result<agent::AgentClient, ClientError>) -> ClientError {
    match r {
        Ok(_) => panic!("connected where it should have failed"),
        Err(e) => e,
    }
}

fn quick() -> ConnectOptions {
    ConnectOptions {
        deadline: Duration::from_millis(600),
        attempt_timeout: Duration::from_millis(200),
        retry_interval: Duration::from_millis(20),
    }
}

/// A VMM's hybrid vsock socket in miniature: reads `CONNECT <port>` (byte by byte,
/// as the protocol requires), answers as `answer` says, then bridges the stream to
/// the agent's Unix socket.
fn hybrid_peer(uds: &Path, agent_sock: PathBuf, answer: &'static str) {
    let listener = UnixListener::bind(uds).unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut host) = conn else { return };
            let agent_sock = agent_sock.clone();
            std::thread::spawn(move || {
                let mut line = Vec::new();
                let mut b = [0u8; 1];
                while host.read(&mut b).unwrap_or(0) == 1 && b[0] != b'\n' {
                    line.push(b[0]);
                }
                assert!(String::from_utf8_lossy(&line).starts_with("CONNECT "), "{line:?}");
                match answer {
                    "silent" => {
                        // Holds the connection open and says nothing.
                        let _ = host.read(&mut [0u8; 1]);
                        return;
                    }
                    "ok" => host.write_all(b"OK 1073741824\n").unwrap(),
                    other => host.write_all(other.as_bytes()).unwrap(),
                }
                let Ok(guest) = UnixStream::connect(&agent_sock) else { return };
                let (mut h2, mut g2) = (host.try_clone().unwrap(), guest.try_clone().unwrap());
                std::thread::spawn(move || std::io::copy(&mut h2, &mut g2));
                let (mut host, mut guest) = (host, guest);
                let _ = std::io::copy(&mut guest, &mut host);
            });
        }
    });
}

#[test]
fn addresses_parse_and_print() {
    for (s, want) in [
        ("vsock://3:1024", AgentAddress::Vsock { cid: 3, port: 1024 }),
        ("hvsock:///run/vfvm/sb1/vsock.sock:1024", AgentAddress::Hybrid { uds: "/run/vfvm/sb1/vsock.sock".into(), port: 1024 }),
        ("hvsock:///odd:path/v.sock:7", AgentAddress::Hybrid { uds: "/odd:path/v.sock".into(), port: 7 }),
        ("unix:///run/agent.sock", AgentAddress::Unix("/run/agent.sock".into())),
    ] {
        let got: AgentAddress = s.parse().unwrap();
        assert_eq!(got, want);
        assert_eq!(got.to_string(), s);
    }
    for bad in ["", "tcp://1.2.3.4:5", "vsock://3", "vsock://x:1", "vsock://3:99999999999", "hvsock://:1024", "unix://"] {
        let err = bad.parse::<AgentAddress>().unwrap_err().to_string();
        assert!(err.contains(&format!("{bad:?}")) && err.contains("expected vsock://"), "{bad}: {err}");
    }
}

#[test]
fn health_over_a_unix_socket() {
    let dir = scratch("unix");
    let sock = dir.join("agent.sock");
    let _server = serve(&format!("unix://{}", sock.display()));
    let client = connect(&AgentAddress::Unix(sock), ConnectOptions::default()).unwrap();
    let r = client.health(ctx(), &HealthRequest::new()).unwrap();
    assert_eq!((r.agent_version.as_str(), r.api_version.as_str()), ("test-agent", "vfvm.agent.v1"));
}

#[test]
fn health_over_hybrid_vsock_through_the_handshake() {
    let dir = scratch("hybrid");
    let agent_sock = dir.join("agent.sock");
    let _server = serve(&format!("unix://{}", agent_sock.display()));
    let vmm = dir.join("vsock.sock");
    hybrid_peer(&vmm, agent_sock, "ok");
    let client = connect(&AgentAddress::Hybrid { uds: vmm, port: 1024 }, ConnectOptions::default()).unwrap();
    for _ in 0..3 {
        assert_eq!(client.health(ctx(), &HealthRequest::new()).unwrap().api_version, "vfvm.agent.v1");
    }
}

#[test]
fn the_client_waits_for_an_agent_that_starts_late() {
    let dir = scratch("late");
    let sock = dir.join("agent.sock");
    let addr = AgentAddress::Unix(sock.clone());
    let waiter = std::thread::spawn(move || connect(&addr, ConnectOptions { deadline: Duration::from_secs(10), ..Default::default() }));
    let _server = serve(&format!("unix://{}", sock.display()));
    let client = waiter.join().unwrap().unwrap();
    assert_eq!(client.health(ctx(), &HealthRequest::new()).unwrap().agent_version, "test-agent");
}

#[test]
fn no_agent_gives_up_at_the_deadline_naming_the_last_error() {
    let dir = scratch("none");
    let started = Instant::now();
    let err = fails(connect(&AgentAddress::Unix(dir.join("nobody.sock")), quick()));
    let elapsed = started.elapsed();
    assert!(matches!(&err, ClientError::GaveUp { attempts, .. } if *attempts > 1), "{err}");
    assert!(err.to_string().contains("nobody.sock") && err.to_string().contains("No such file"), "{err}");
    assert!(elapsed < Duration::from_secs(2), "took {elapsed:?} for a 600 ms deadline");
}

/// A listener whose backlog is full (a VMM queues hybrid vsock clients there until
/// its guest's vsock driver is up) fails each attempt at once, so the deadline holds;
/// a blocking connect would wait for as long as nobody accepts.
#[test]
fn a_full_backlog_does_not_hold_the_client_past_its_deadline() {
    use std::os::fd::AsRawFd;
    let dir = scratch("backlog");
    let path = dir.join("full.sock");
    let listener = UnixListener::bind(&path).unwrap();
    // SAFETY: listen(2) again on our listening socket only shortens its backlog.
    assert_eq!(unsafe { libc::listen(listener.as_raw_fd(), 1) }, 0);
    let mut queued = Vec::new();
    loop {
        match vfvm_protocols::client::unix_connect(&path) {
            Ok(s) => queued.push(s),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("connect to {}: {e}", path.display()),
        }
        assert!(queued.len() < 64, "the backlog never filled");
    }
    // On a thread, so that a connect that hangs fails the test instead of hanging it.
    let (tx, rx) = std::sync::mpsc::channel();
    let addr = AgentAddress::Hybrid { uds: path.clone(), port: 1024 };
    std::thread::spawn(move || {
        let started = Instant::now();
        let err = fails(connect(&addr, quick()));
        let _ = tx.send((err, started.elapsed()));
    });
    let (err, took) = rx.recv_timeout(Duration::from_secs(10)).expect("connect still blocked 10 s into a 600 ms deadline");
    assert!(matches!(err, ClientError::GaveUp { attempts, .. } if attempts > 1), "{err}");
    assert!(took < Duration::from_secs(2), "{took:?} for a 600 ms deadline");
    drop(listener);
}

#[test]
fn a_silent_vmm_times_out_and_a_wrong_answer_fails_at_once() {
    let dir = scratch("bad-vmm");
    let silent = dir.join("silent.sock");
    hybrid_peer(&silent, dir.join("unused.sock"), "silent");
    let started = Instant::now();
    let err = fails(connect(&AgentAddress::Hybrid { uds: silent, port: 1024 }, quick()));
    assert!(matches!(err, ClientError::GaveUp { .. }), "{err}");
    assert!(err.to_string().contains("read the CONNECT answer"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());

    let wrong = dir.join("wrong.sock");
    hybrid_peer(&wrong, dir.join("unused.sock"), "NOPE nothing here\n");
    let started = Instant::now();
    let err = fails(connect(&AgentAddress::Hybrid { uds: wrong, port: 1024 }, ConnectOptions::default()));
    assert!(matches!(&err, ClientError::Handshake { answer, .. } if answer == "NOPE nothing here"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(1), "a wrong answer must not be retried for 30 s");
}

#[test]
fn oversized_messages_are_refused_and_the_agent_keeps_serving() {
    let dir = scratch("big");
    let sock = dir.join("agent.sock");
    let _server = serve(&format!("unix://{}", sock.display()));
    let client = connect(&AgentAddress::Unix(sock), ConnectOptions::default()).unwrap();
    let mut req = agent::CreateContainerRequest::new();
    req.container_id = "c1".into();
    req.oci_spec_json = vec![b' '; 5 << 20];
    let err = client.create_container(ctx(), &req).unwrap_err().to_string();
    assert!(err.to_lowercase().contains("length") || err.contains("exceed"), "{err}");
    assert_eq!(client.health(ctx(), &HealthRequest::new()).unwrap().agent_version, "test-agent");
}

#[test]
#[ignore = "needs the lab: run by cargo xtask test"]
fn lab_health_over_af_vsock() {
    // The loopback transport gives AF_VSOCK without a VM (CID 1 = this machine).
    let out = std::process::Command::new("modprobe").arg("vsock_loopback").output().unwrap();
    assert!(out.status.success(), "modprobe vsock_loopback: {}", String::from_utf8_lossy(&out.stderr));
    let _server = serve("vsock://1:10240");
    let client = connect(&"vsock://1:10240".parse().unwrap(), ConnectOptions::default()).unwrap();
    assert_eq!(client.health(ctx(), &HealthRequest::new()).unwrap().api_version, "vfvm.agent.v1");
    // Nothing listens on another port: a bounded, clear failure.
    let err = fails(connect(&"vsock://1:10241".parse().unwrap(), quick())).to_string();
    assert!(err.contains("vsock://1:10241") && (err.contains("reset") || err.contains("refused")), "{err}");
}
