//! The parts of the OCI runtime spec the runner uses, as lenient serde structs:
//! unknown fields are ignored (specs carry much we do not act on), wrong types
//! are errors.

use std::collections::HashMap;

use serde::Deserialize;

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Spec {
    pub process: Option<Process>,
    pub root: Option<Root>,
    pub hostname: String,
    pub mounts: Vec<Mount>,
    pub linux: Option<Linux>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Process {
    pub terminal: bool,
    pub user: User,
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
    pub rlimits: Vec<Rlimit>,
    pub no_new_privileges: bool,
    pub console_size: Option<ConsoleSize>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct User {
    pub uid: u32,
    pub gid: u32,
    pub umask: Option<u32>,
    pub additional_gids: Vec<u32>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default)]
pub struct ConsoleSize {
    pub height: u32,
    pub width: u32,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Rlimit {
    #[serde(rename = "type")]
    pub kind: String,
    pub hard: u64,
    pub soft: u64,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default)]
pub struct Root {
    pub path: String,
    pub readonly: bool,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default)]
pub struct Mount {
    pub destination: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub source: String,
    pub options: Vec<String>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Linux {
    pub resources: Option<Resources>,
    pub sysctl: HashMap<String, String>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default)]
pub struct Resources {
    pub memory: Option<Memory>,
    pub cpu: Option<Cpu>,
    pub pids: Option<Pids>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default)]
pub struct Memory {
    pub limit: Option<i64>,
    pub swap: Option<i64>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default)]
pub struct Cpu {
    pub shares: Option<u64>,
    pub quota: Option<i64>,
    pub period: Option<u64>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default)]
pub struct Pids {
    pub limit: i64,
}

/// `RLIMIT_*` names to their resource numbers.
pub fn rlimit_resource(name: &str) -> Option<super::spawn::RlimitResource> {
    let r = match name {
        "RLIMIT_AS" => libc::RLIMIT_AS,
        "RLIMIT_CORE" => libc::RLIMIT_CORE,
        "RLIMIT_CPU" => libc::RLIMIT_CPU,
        "RLIMIT_DATA" => libc::RLIMIT_DATA,
        "RLIMIT_FSIZE" => libc::RLIMIT_FSIZE,
        "RLIMIT_LOCKS" => libc::RLIMIT_LOCKS,
        "RLIMIT_MEMLOCK" => libc::RLIMIT_MEMLOCK,
        "RLIMIT_MSGQUEUE" => libc::RLIMIT_MSGQUEUE,
        "RLIMIT_NICE" => libc::RLIMIT_NICE,
        "RLIMIT_NOFILE" => libc::RLIMIT_NOFILE,
        "RLIMIT_NPROC" => libc::RLIMIT_NPROC,
        "RLIMIT_RSS" => libc::RLIMIT_RSS,
        "RLIMIT_RTPRIO" => libc::RLIMIT_RTPRIO,
        "RLIMIT_RTTIME" => libc::RLIMIT_RTTIME,
        "RLIMIT_SIGPENDING" => libc::RLIMIT_SIGPENDING,
        "RLIMIT_STACK" => libc::RLIMIT_STACK,
        _ => return None,
    };
    Some(r)
}

/// Mount options: kernel flags, and the rest as the filesystem's data string.
pub struct MountOptions {
    pub flags: libc::c_ulong,
    pub bind: bool,
    pub recursive: bool,
    pub data: Vec<String>,
}

pub fn parse_mount_options(options: &[String]) -> MountOptions {
    let mut o = MountOptions { flags: 0, bind: false, recursive: false, data: Vec::new() };
    for opt in options {
        match opt.as_str() {
            "ro" => o.flags |= libc::MS_RDONLY,
            "rw" => o.flags &= !libc::MS_RDONLY,
            "nosuid" => o.flags |= libc::MS_NOSUID,
            "suid" => o.flags &= !libc::MS_NOSUID,
            "nodev" => o.flags |= libc::MS_NODEV,
            "dev" => o.flags &= !libc::MS_NODEV,
            "noexec" => o.flags |= libc::MS_NOEXEC,
            "exec" => o.flags &= !libc::MS_NOEXEC,
            "sync" => o.flags |= libc::MS_SYNCHRONOUS,
            "dirsync" => o.flags |= libc::MS_DIRSYNC,
            "noatime" => o.flags |= libc::MS_NOATIME,
            "nodiratime" => o.flags |= libc::MS_NODIRATIME,
            "relatime" => o.flags |= libc::MS_RELATIME,
            "strictatime" => o.flags |= libc::MS_STRICTATIME,
            "bind" => o.bind = true,
            "rbind" => {
                o.bind = true;
                o.recursive = true;
            }
            // Propagation: everything in the container's namespace is private.
            "private" | "rprivate" | "shared" | "rshared" | "slave" | "rslave" | "unbindable" | "runbindable" | "defaults" => {}
            other => o.data.push(other.to_string()),
        }
    }
    o
}
