//! Log lines the guest can trigger, bounded: a guest that loops on a bad access
//! (a malformed vsock packet, a BAR placed over another, an MSI-X vector KVM
//! refuses) must not fill the host's logs. Each call site of [`guest_warn!`] logs at
//! most [`LINES_PER_WINDOW`] lines per [`WINDOW`]; the first line after a quiet
//! spell says how many were dropped (`suppressed=N`).

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lines one call site may log per window.
pub const LINES_PER_WINDOW: u32 = 10;
pub const WINDOW: Duration = Duration::from_secs(60);

/// One call site's budget.
pub struct LogLimit {
    state: Mutex<State>,
}

struct State {
    window_start: Option<Instant>,
    logged: u32,
    suppressed: u64,
}

impl LogLimit {
    pub const fn new() -> Self {
        Self { state: Mutex::new(State { window_start: None, logged: 0, suppressed: 0 }) }
    }

    /// Whether a line may go out now; if so, how many were dropped since the last one.
    pub fn admit(&self) -> Option<u64> {
        self.admit_at(Instant::now())
    }

    fn admit_at(&self, now: Instant) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let fresh = s.window_start.is_none_or(|start| now.saturating_duration_since(start) >= WINDOW);
        if fresh {
            s.window_start = Some(now);
            s.logged = 0;
        }
        if s.logged >= LINES_PER_WINDOW {
            s.suppressed = s.suppressed.saturating_add(1);
            return None;
        }
        s.logged += 1;
        Some(std::mem::take(&mut s.suppressed))
    }
}

impl Default for LogLimit {
    fn default() -> Self {
        Self::new()
    }
}

/// `tracing::warn!` for what the guest can make happen, bounded per call site (see
/// the module).
#[macro_export]
macro_rules! guest_warn {
    ($($arg:tt)+) => {{
        static LIMIT: $crate::ratelimit::LogLimit = $crate::ratelimit::LogLimit::new();
        match LIMIT.admit() {
            Some(0) => tracing::warn!($($arg)+),
            Some(suppressed) => tracing::warn!(suppressed, $($arg)+),
            None => {}
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_window_lets_a_few_lines_out_and_counts_the_rest() {
        let limit = LogLimit::new();
        let t0 = Instant::now();
        for _ in 0..LINES_PER_WINDOW {
            assert_eq!(limit.admit_at(t0), Some(0));
        }
        for i in 0..1000u64 {
            assert_eq!(limit.admit_at(t0 + Duration::from_millis(i)), None);
        }
        // The next window: its first line carries the count of those dropped.
        let t1 = t0 + WINDOW;
        assert_eq!(limit.admit_at(t1), Some(1000));
        assert_eq!(limit.admit_at(t1), Some(0));
    }
}
