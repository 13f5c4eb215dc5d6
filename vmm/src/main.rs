//! `vfvm-vmm`: the KVM microVM monitor, one process per pod sandbox.
//!
//! Not implemented yet (issue #3). Until then the binary says so and exits non-zero,
//! so nothing mistakes it for a working VMM.

use std::process::ExitCode;

fn main() -> ExitCode {
    if std::env::args().nth(1).as_deref() == Some("--version") {
        println!("vfvm-vmm {}", env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    eprintln!("vfvm-vmm {}: not implemented yet (issue #3); refusing to run", env!("CARGO_PKG_VERSION"));
    ExitCode::FAILURE
}
