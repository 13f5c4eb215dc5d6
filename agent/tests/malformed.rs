//! Raw bytes at the real agent: malformed ttrpc frames, undecodable payloads, a
//! length past ttrpc's 4 MiB limit, an unknown method. Each gets an error answer or
//! a closed connection, never a crash, and the agent goes on serving.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use vfvm_protocols::agent::{self, HealthRequest};

mod common;
use common::{connect_to, RunningAgent};

const MESSAGE_TYPE_REQUEST: u8 = 1;

fn start() -> RunningAgent {
    let agent = RunningAgent::start("vfvm-agent-raw", "frames");
    assert_healthy(&agent);
    agent
}

/// A fresh connection answers Health: the agent is alive and serving.
fn assert_healthy(a: &RunningAgent) {
    let client = connect_to(&a.sock);
    let ctx = ttrpc::context::with_timeout(i64::try_from(Duration::from_secs(5).as_nanos()).unwrap());
    assert_eq!(client.health(ctx, &HealthRequest::new()).unwrap().api_version, agent::API_VERSION);
}

fn frame(len: u32, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&len.to_be_bytes());
    f.extend_from_slice(&stream.to_be_bytes());
    f.push(MESSAGE_TYPE_REQUEST);
    f.push(0);
    f.extend_from_slice(payload);
    f
}

/// Sends raw bytes and reads whatever comes back until the agent answers or closes.
fn exchange(a: &RunningAgent, bytes: &[u8]) -> Vec<u8> {
    let mut s = UnixStream::connect(&a.sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = s.write_all(bytes);
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                got.extend_from_slice(&buf[..n]);
                if got.len() >= 10 {
                    break; // a response header arrived
                }
            }
            Err(_) => break, // timed out: neither answer nor close, checked below
        }
    }
    got
}

#[test]
fn malformed_frames_do_not_hurt_the_agent() {
    let a = start();
    // An undecodable Request protobuf.
    let garbage = [0xff, 0xff, 0xff, 0xff, 0xff];
    let reply = exchange(&a, &frame(u32::try_from(garbage.len()).unwrap(), 1, &garbage));
    assert!(reply.is_empty() || reply.len() >= 10, "{reply:?}");
    assert_healthy(&a);

    // A header claiming 64 MiB: refused, not allocated.
    let _ = exchange(&a, &frame(64 << 20, 3, &[]));
    assert_healthy(&a);

    // A well-formed request for a method that does not exist.
    let mut req = ttrpc::Request::new();
    req.service = "vfvm.agent.v1.Agent".into();
    req.method = "NoSuchMethod".into();
    req.timeout_nano = 1_000_000_000;
    let payload = protobuf::Message::write_to_bytes(&req).unwrap();
    let reply = exchange(&a, &frame(u32::try_from(payload.len()).unwrap(), 5, &payload));
    assert!(reply.len() >= 10, "no answer to an unknown method: {reply:?}");
    let len = u32::from_be_bytes([reply[0], reply[1], reply[2], reply[3]]) as usize;
    let stream = u32::from_be_bytes([reply[4], reply[5], reply[6], reply[7]]);
    assert_eq!(stream, 5);
    let mut body = reply[10..].to_vec();
    if body.len() < len {
        let mut s = UnixStream::connect(&a.sock).unwrap();
        let _ = s.read_to_end(&mut body);
    }
    let resp: ttrpc::Response = protobuf::Message::parse_from_bytes(&body[..len.min(body.len())]).unwrap();
    assert!(resp.status.message.contains("NoSuchMethod") || resp.status.code.value() != 0, "{resp:?}");
    assert_healthy(&a);

    // Truncated header, then close.
    let _ = exchange(&a, &[0, 0, 0]);
    assert_healthy(&a);
}
