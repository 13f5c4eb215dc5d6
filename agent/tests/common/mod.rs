//! What the agent's host tests share: the real `vfvm-agent` binary serving on a Unix
//! socket in a throwaway network namespace, with a connected client, all of it
//! removed when dropped.

#![allow(dead_code)] // each test binary uses its own part

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use vfvm_protocols::agent::AgentClient;
use vfvm_protocols::client::{connect, AgentAddress, ConnectOptions};

pub struct RunningAgent {
    /// The network namespace the agent configures (`/run/netns/<netns>`).
    pub netns: String,
    /// Scratch directory: the socket, resolv.conf, whatever the test puts there.
    pub dir: PathBuf,
    pub sock: PathBuf,
    pub client: AgentClient,
    child: Child,
}

impl RunningAgent {
    /// Starts the agent (`--no-init`) in a new netns named `<prefix>-<name>-<pid>`.
    pub fn start(prefix: &str, name: &str) -> Self {
        let netns = format!("{prefix}-{name}-{}", std::process::id());
        let status = Command::new("ip").args(["netns", "add", &netns]).status().unwrap();
        assert!(status.success(), "ip netns add (needs root)");
        let dir = std::env::temp_dir().join(&netns);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("agent.sock");
        let child = Command::new(env!("CARGO_BIN_EXE_vfvm-agent"))
            .args(["--no-init", "--listen"])
            .arg(format!("unix://{}", sock.display()))
            .arg("--netns")
            .arg(format!("/run/netns/{netns}"))
            .arg("--resolv-conf")
            .arg(dir.join("resolv.conf"))
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let client = connect_to(&sock);
        RunningAgent { netns, dir, sock, client, child }
    }
}

/// A new client connection to the agent at `sock` (retrying while it starts).
pub fn connect_to(sock: &std::path::Path) -> AgentClient {
    match connect(&AgentAddress::Unix(sock.to_path_buf()), ConnectOptions { deadline: Duration::from_secs(20), ..Default::default() }) {
        Ok(c) => c,
        Err(e) => panic!("connecting to the agent: {e}"),
    }
}

impl Drop for RunningAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = Command::new("ip").args(["netns", "del", &self.netns]).status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The status code of an RPC error.
pub fn code(e: &ttrpc::Error) -> ttrpc::Code {
    match e {
        ttrpc::Error::RpcStatus(s) => s.code(),
        other => panic!("expected an RPC status, got {other:?}"),
    }
}
