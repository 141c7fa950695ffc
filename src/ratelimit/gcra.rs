//! The generic cell rate algorithm: one timestamp per client (the "theoretical arrival time"),
//! exact at every instant, so there is no double burst at window edges.
//!
//! A policy of `count` requests per `period` with bucket `burst` lets a client send `burst`
//! requests at once and then one every `period / count`. A stored time that is not in the future
//! means a full bucket, the same as no entry at all, so idle clients can be forgotten freely.

use std::time::Duration;

/// A rate and burst, in the time unit of the store (nanoseconds here, microseconds in Redis).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Gcra {
    /// Time between requests at the steady rate.
    pub interval: u64,
    /// Requests allowed at once.
    pub burst: u64,
}

/// The answer for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// Whether the request may pass.
    pub allowed: bool,
    /// Requests still allowed right now after this one.
    pub remaining: u64,
    /// Time until the bucket is full again.
    pub reset_after: Duration,
    /// For a refused request: time until one would be allowed.
    pub retry_after: Duration,
}

impl Gcra {
    /// A policy of `count` per `period` with `burst` at once.
    pub fn new(count: u64, period: Duration, burst: u64) -> Gcra {
        let interval = (period.as_nanos() / u128::from(count.max(1))).max(1) as u64;
        Gcra {
            interval,
            burst: burst.max(1),
        }
    }

    /// Decides a request at `now` given the stored time (`None` if the client is unknown).
    /// Returns the decision and, when allowed, the time to store.
    pub fn decide(&self, stored: Option<u64>, now: u64) -> (Decision, Option<u64>) {
        let (now_i, interval) = (i128::from(now), i128::from(self.interval));
        let tat = i128::from(stored.unwrap_or(now).max(now));
        let new_tat = tat + interval;
        let allow_at = new_tat - i128::from(self.burst) * interval;
        let nanos = |v: i128| Duration::from_nanos(v.clamp(0, i128::from(u64::MAX)) as u64);
        if now_i < allow_at {
            let d = Decision {
                allowed: false,
                remaining: 0,
                reset_after: nanos(tat - now_i),
                retry_after: nanos(allow_at - now_i),
            };
            return (d, None);
        }
        let d = Decision {
            allowed: true,
            remaining: ((now_i - allow_at) / interval) as u64,
            reset_after: nanos(new_tat - now_i),
            retry_after: Duration::ZERO,
        };
        (d, Some(new_tat.min(i128::from(u64::MAX)) as u64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    #[test]
    fn burst_then_steady_rate() {
        let g = Gcra::new(10, Duration::from_secs(1), 5);
        let mut tat = None;
        for i in 0..5 {
            let (d, t) = g.decide(tat, 0);
            assert!(d.allowed, "request {i} of the burst");
            assert_eq!(d.remaining, 4 - i);
            tat = t;
        }
        let (d, t) = g.decide(tat, 0);
        assert!(!d.allowed);
        assert_eq!(t, None);
        assert_eq!(d.retry_after, Duration::from_millis(100));
        // One interval later exactly one more passes.
        let (d, t) = g.decide(tat, S / 10);
        assert!(d.allowed);
        let (d, _) = g.decide(t, S / 10);
        assert!(!d.allowed);
    }

    #[test]
    fn no_double_burst_at_window_edges() {
        // 100 per second, burst 100: over any 2 s a client gets at most 100 + 200.
        let g = Gcra::new(100, Duration::from_secs(1), 100);
        let mut tat = None;
        let mut allowed = 0;
        let mut now = 0;
        while now <= 2 * S {
            for _ in 0..10 {
                let (d, t) = g.decide(tat, now);
                if d.allowed {
                    allowed += 1;
                    tat = t;
                }
            }
            now += S / 1000;
        }
        assert!((299..=301).contains(&allowed), "{allowed}");
    }

    #[test]
    fn idle_client_has_a_full_bucket() {
        let g = Gcra::new(1, Duration::from_secs(1), 3);
        let (_, tat) = g.decide(None, 0);
        let (d, _) = g.decide(tat, 10 * S);
        assert_eq!(d.remaining, 2);
    }
}
