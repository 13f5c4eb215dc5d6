//! `vfvm-crictl`: a crictl-compatible CRI client for the project's tests (crictl
//! is not packaged where the lab gets its software). It takes crictl's global
//! options, subcommands and JSON config files, and prints what crictl prints for
//! the parts the tests read; the tests run real `crictl` instead when it is on
//! PATH. The library holds what has unit tests: config files, log lines, the
//! JSON crictl's `inspect` prints, and the connection.

pub mod client;
pub mod config;
pub mod inspect;
pub mod logs;
