//! Retry delays: one exponential backoff with jitter, for every retry loop of the daemon (source
//! reconnects, data-file stores, checkpoint stores, the writer's lease renewal).
//!
//! A leaf: it imports nothing from the crate.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Exponential backoff with jitter: each delay is uniform in `[current/2, current]`, then the
/// current delay doubles up to a maximum.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    current: Duration,
    rng: SplitMix,
}

impl Backoff {
    /// Starts at `initial`, doubles up to `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        Backoff {
            initial,
            max: max.max(initial),
            current: initial,
            rng: SplitMix::seeded(),
        }
    }

    /// The next delay: uniform in `[current/2, current]`; then the current delay doubles.
    pub fn next_delay(&mut self) -> Duration {
        let c = self.current;
        self.current = c.saturating_mul(2).min(self.max);
        let half = c / 2;
        half + half.mul_f64(self.rng.unit())
    }

    /// Back to the initial delay (after a success).
    pub fn reset(&mut self) {
        self.current = self.initial;
    }
}

/// SplitMix64: the jitter only has to decorrelate clients that retry at the same moment, so a
/// small generator seeded from the clock and a process-wide counter is enough.
#[derive(Debug, Clone)]
struct SplitMix(u64);

impl SplitMix {
    fn seeded() -> Self {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        SplitMix(nanos ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ u64::from(std::process::id()))
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_doubles_caps_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let d: Vec<Duration> = (0..6).map(|_| b.next_delay()).collect();
        let bounds = [100, 200, 400, 800, 1000, 1000];
        for (got, hi) in d.iter().zip(bounds) {
            let hi = Duration::from_millis(hi);
            assert!(
                *got >= hi / 2 && *got <= hi,
                "{got:?} not in [{:?}, {hi:?}]",
                hi / 2
            );
        }
        b.reset();
        let first = b.next_delay();
        assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
    }

    #[test]
    fn jitter_spreads_delays() {
        let mut b = Backoff::new(Duration::from_secs(10), Duration::from_secs(10));
        let d: std::collections::HashSet<Duration> = (0..20).map(|_| b.next_delay()).collect();
        assert!(d.len() > 15, "delays should differ: {d:?}");
    }

    #[test]
    fn huge_settings_do_not_overflow() {
        let mut b = Backoff::new(Duration::MAX / 2, Duration::MAX);
        for _ in 0..4 {
            let _ = b.next_delay();
        }
    }
}
