//! Time, behind a trait, so that tests and simulations can move it by hand: group sessions,
//! idle producers, record timestamps the broker assigns and every deadline the broker computes
//! read it. (Waiting itself uses tokio's timers, which tests pause and advance with
//! `tokio::time::pause`.)

use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// A source of time.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// Monotonic time, for durations and deadlines.
    fn now(&self) -> Instant;
    /// Wall-clock time in milliseconds since the Unix epoch, for timestamps.
    fn unix_ms(&self) -> i64;
}

/// The operating system's clocks.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }

    fn unix_ms(&self) -> i64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
    }
}

/// A clock that moves only when told to (tests, simulation). Both readings start at the moment
/// of creation (`unix_ms` at the given wall-clock time) and advance together.
#[derive(Debug)]
pub struct ManualClock {
    start: Instant,
    start_unix_ms: i64,
    elapsed: Mutex<Duration>,
}

impl ManualClock {
    /// A clock reading `unix_ms` now.
    pub fn new(unix_ms: i64) -> ManualClock {
        ManualClock {
            start: Instant::now(),
            start_unix_ms: unix_ms,
            elapsed: Mutex::new(Duration::ZERO),
        }
    }

    /// Moves time forward.
    pub fn advance(&self, by: Duration) {
        let mut elapsed = self
            .elapsed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *elapsed = elapsed.saturating_add(by);
    }

    fn elapsed(&self) -> Duration {
        *self
            .elapsed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        self.start + self.elapsed()
    }

    fn unix_ms(&self) -> i64 {
        let elapsed_ms = i64::try_from(self.elapsed().as_millis()).unwrap_or(i64::MAX);
        self.start_unix_ms.saturating_add(elapsed_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manual_clock_moves_only_when_advanced() {
        let clock = ManualClock::new(1_000);
        let t0 = clock.now();
        assert_eq!(clock.unix_ms(), 1_000);
        clock.advance(Duration::from_millis(250));
        assert_eq!(clock.now() - t0, Duration::from_millis(250));
        assert_eq!(clock.unix_ms(), 1_250);
        assert!(SystemClock.unix_ms() > 1_600_000_000_000);
    }
}
