//! Pacing of the agent's empty answers, so a misbehaving guest cannot make the shim spin.
//!
//! A well-behaved agent holds a read or event request until it has something or the
//! request's wait ends, so it answers "nothing" at most once per wait (a second or two).
//! An agent that answers nothing at once, again and again, would keep a shim thread
//! busy for ever. Past a small burst, such answers are paced to a few a second: a token
//! bucket, which a real agent never empties.

use std::time::{Duration, Instant};

/// Empty answers taken without a pause (a real agent's come one per wait).
pub const IDLE_BURST: u32 = 8;
/// Empty answers a second past the burst.
pub const IDLE_PER_SEC: u32 = 4;

/// A token bucket for answers that carried nothing.
#[derive(Debug)]
pub struct IdlePacer {
    tokens: f64,
    burst: f64,
    per_sec: f64,
    /// When `tokens` was last brought up to date.
    at: Instant,
    /// Whether pacing has begun (so the warning is said once).
    engaged: bool,
}

impl IdlePacer {
    pub fn new(now: Instant) -> IdlePacer {
        IdlePacer::with_rate(now, IDLE_BURST, IDLE_PER_SEC)
    }

    pub fn with_rate(now: Instant, burst: u32, per_sec: u32) -> IdlePacer {
        let burst = f64::from(burst.max(1));
        IdlePacer { tokens: burst, burst, per_sec: f64::from(per_sec.max(1)), at: now, engaged: false }
    }

    /// Notes an empty answer at `now`; answers how long to wait before asking again,
    /// and whether this is the first time the pacer holds the caller back.
    pub fn idle_at(&mut self, now: Instant) -> (Duration, bool) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.per_sec).min(self.burst);
        // A caller asking before its last wait ended queues behind it.
        self.at = self.at.max(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return (Duration::ZERO, false);
        }
        // The token that will have come in by then is spent on this answer.
        self.at += Duration::from_secs_f64((1.0 - self.tokens) / self.per_sec);
        self.tokens = 0.0;
        let first = !self.engaged;
        self.engaged = true;
        (self.at.saturating_duration_since(now), first)
    }

    /// [`idle_at`](Self::idle_at) now, then waits as long as it says (a blocking
    /// thread's pause: this paces, it does not synchronise). Answers whether pacing
    /// began with this answer.
    pub fn idle(&mut self) -> bool {
        let (wait, first) = self.idle_at(Instant::now());
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
        first
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_passes_then_answers_are_paced_to_the_rate() {
        let t0 = Instant::now();
        let mut p = IdlePacer::with_rate(t0, 3, 4);
        for _ in 0..3 {
            assert_eq!(p.idle_at(t0), (Duration::ZERO, false));
        }
        // The bucket is empty: the next answer waits a quarter second, and says so once.
        assert_eq!(p.idle_at(t0), (Duration::from_millis(250), true));
        // Asked again at once (the caller did not wait): it waits behind the first.
        let (wait, first) = p.idle_at(t0);
        assert_eq!(wait, Duration::from_millis(500));
        assert!(!first);
    }

    #[test]
    fn answers_at_the_rate_are_never_held_back_and_a_pause_refills_the_burst() {
        let t0 = Instant::now();
        let mut p = IdlePacer::with_rate(t0, 2, 4);
        // One empty answer a second, as a real agent's reads give them: never paced.
        for s in 0..20 {
            assert_eq!(p.idle_at(t0 + Duration::from_secs(s)).0, Duration::ZERO, "second {s}");
        }
        // Drain it, then pause: the whole burst is back, no more.
        let t1 = t0 + Duration::from_secs(20);
        while p.idle_at(t1).0.is_zero() {}
        let t2 = t1 + Duration::from_secs(60);
        assert_eq!(p.idle_at(t2).0, Duration::ZERO);
        assert_eq!(p.idle_at(t2).0, Duration::ZERO);
        assert!(!p.idle_at(t2).0.is_zero());
    }

    #[test]
    fn any_number_of_instant_answers_is_held_to_burst_plus_rate_times_time() {
        let t0 = Instant::now();
        let mut p = IdlePacer::with_rate(t0, IDLE_BURST, IDLE_PER_SEC);
        let mut now = t0;
        let mut answers = 0u32;
        // A caller that asks again as soon as the pacer lets it, for ten seconds.
        while now < t0 + Duration::from_secs(10) {
            now += p.idle_at(now).0;
            answers += 1;
        }
        assert!(answers <= IDLE_BURST + 10 * IDLE_PER_SEC + 1, "{answers} answers in 10 s");
    }
}
