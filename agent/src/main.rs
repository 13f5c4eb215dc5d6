//! `vfvm-agent`: PID 1 of the guest, serving the shim over ttrpc on vsock.
//!
//! Not implemented yet (issue #4). Until then the binary says so and exits non-zero,
//! so nothing mistakes it for a working agent.

use std::process::ExitCode;

fn main() -> ExitCode {
    if std::env::args().nth(1).as_deref() == Some("--version") {
        println!("vfvm-agent {}", env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    eprintln!("vfvm-agent {}: not implemented yet (issue #4); refusing to run", env!("CARGO_PKG_VERSION"));
    ExitCode::FAILURE
}
