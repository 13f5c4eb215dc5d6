//! `vfvm-crictl`: a crictl-compatible CRI client for the project's tests (crictl
//! is not packaged where the lab gets its software). It takes crictl's global
//! options, subcommands and JSON config files, and prints what crictl prints for
//! the parts the tests read; the tests run real `crictl` instead when it is on
//! PATH. The library holds what has unit tests: config files, log lines, the
//! JSON crictl's `inspect` prints, the connection, and crictl's error lines
//! (written by `vfvm-crictl`, read back by the lab tests).

pub mod client;
pub mod config;
pub mod inspect;
pub mod logrus;
pub mod logs;
