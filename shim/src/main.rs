//! `containerd-shim-vfvm-v2`: the containerd shim v2 that runs a pod sandbox in a vfvm VM.
//!
//! Not implemented yet (issue #6). Until then the binary says so and exits non-zero,
//! so nothing mistakes it for a working shim.

use std::process::ExitCode;

fn main() -> ExitCode {
    if std::env::args().nth(1).as_deref() == Some("--version") {
        println!("containerd-shim-vfvm-v2 {}", env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    eprintln!("containerd-shim-vfvm-v2 {}: not implemented yet (issue #6); refusing to run", env!("CARGO_PKG_VERSION"));
    ExitCode::FAILURE
}
