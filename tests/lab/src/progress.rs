//! Progress lines on stderr, stamped with the time since the harness started and the
//! lab run's id, so a slow boot is visibly alive and a CI log says which run said what.

use std::sync::OnceLock;
use std::time::Instant;

static START: OnceLock<Instant> = OnceLock::new();
static RUN_ID: OnceLock<String> = OnceLock::new();

pub fn start_clock() {
    START.get_or_init(Instant::now);
}

pub fn set_run_id(id: &str) {
    let _ = RUN_ID.set(id.to_string());
}

pub fn elapsed_secs() -> f64 {
    START.get_or_init(Instant::now).elapsed().as_secs_f64()
}

pub fn emit(msg: std::fmt::Arguments) {
    match RUN_ID.get() {
        Some(id) => eprintln!("[vfvm-lab {id} +{:.1}s] {msg}", elapsed_secs()),
        None => eprintln!("[vfvm-lab +{:.1}s] {msg}", elapsed_secs()),
    }
}

#[macro_export]
macro_rules! progress {
    ($($arg:tt)*) => { $crate::progress::emit(format_args!($($arg)*)) };
}
