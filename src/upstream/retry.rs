//! Retries: which requests may be retried, and the budget that keeps retries from multiplying
//! load during an outage.
//!
//! The budget allows, over a sliding window of the last 10 seconds, `budget` × the upstream's
//! requests plus `min_per_second` × 10 retries (as Finagle's `RetryBudget`), so that low traffic
//! can still retry while a failing upstream gets at most `budget` more load. Counts live in ten
//! one-second buckets of atomics: no lock on the request path. Time is passed in (`now`).

use super::{Outcome, OutcomeSet};
use http::Method;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// `retry = {...}` of an upstream, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct RetrySpec {
    /// Retries after the first attempt, each on a replica not tried yet.
    pub attempts: u32,
    /// Outcomes that are retried.
    pub on: OutcomeSet,
    /// Retries allowed as a share (0 to 1) of recent requests.
    pub budget: f64,
    /// Retries per second allowed on top of the share.
    pub min_per_second: u32,
    /// Largest request body kept for a retry (only with a Content-Length up to it).
    pub max_body: u64,
}

/// Whether `method` may be sent again after `outcome`.
///
/// A connect failure means no byte left Palisade, so any method may go to another replica.
/// After that, only the safe methods GET, HEAD and OPTIONS are retried: PUT and DELETE are
/// idempotent by RFC 9110, but legacy APIs often do not honour it.
pub fn method_allows(method: &Method, outcome: Outcome) -> bool {
    outcome == Outcome::Connect || matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

const WINDOW_SECS: u64 = 10;

#[derive(Debug)]
struct Bucket {
    second: AtomicU64,
    requests: AtomicU64,
    retries: AtomicU64,
}

/// An upstream's retry budget.
#[derive(Debug)]
pub struct RetryBudget {
    origin: Instant,
    buckets: [Bucket; WINDOW_SECS as usize],
}

impl RetryBudget {
    /// An empty budget.
    pub fn new(now: Instant) -> RetryBudget {
        RetryBudget {
            origin: now,
            buckets: std::array::from_fn(|_| Bucket {
                second: AtomicU64::new(u64::MAX),
                requests: AtomicU64::new(0),
                retries: AtomicU64::new(0),
            }),
        }
    }

    fn second(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.origin).as_secs()
    }

    fn bucket(&self, second: u64) -> &Bucket {
        let b = &self.buckets[(second % WINDOW_SECS) as usize];
        let seen = b.second.load(Ordering::Acquire);
        if seen != second
            && b.second
                .compare_exchange(seen, second, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            b.requests.store(0, Ordering::Relaxed);
            b.retries.store(0, Ordering::Relaxed);
        }
        b
    }

    /// Counts a request (not its retries).
    pub fn record_request(&self, now: Instant) {
        self.bucket(self.second(now))
            .requests
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Takes one retry from the budget if it has one left.
    pub fn try_retry(&self, spec: &RetrySpec, now: Instant) -> bool {
        let second = self.second(now);
        let current = self.bucket(second);
        let (mut requests, mut retries) = (0u64, 0u64);
        for b in &self.buckets {
            let s = b.second.load(Ordering::Acquire);
            if s <= second && s + WINDOW_SECS > second {
                requests += b.requests.load(Ordering::Relaxed);
                retries += b.retries.load(Ordering::Relaxed);
            }
        }
        let allowed =
            spec.budget * requests as f64 + f64::from(spec.min_per_second) * WINDOW_SECS as f64;
        if (retries + 1) as f64 > allowed {
            return false;
        }
        current.retries.fetch_add(1, Ordering::Relaxed);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn spec(budget: f64, min_per_second: u32) -> RetrySpec {
        RetrySpec {
            attempts: 2,
            on: OutcomeSet::default(),
            budget,
            min_per_second,
            max_body: 0,
        }
    }

    #[test]
    fn retries_stay_within_the_share_of_recent_requests() {
        let t0 = Instant::now();
        let b = RetryBudget::new(t0);
        let spec = spec(0.2, 0);
        for _ in 0..100 {
            b.record_request(t0);
        }
        let granted = (0..100).filter(|_| b.try_retry(&spec, t0)).count();
        assert_eq!(granted, 20);
        // Spread over the window, the counts add up.
        let t5 = t0 + Duration::from_secs(5);
        for _ in 0..50 {
            b.record_request(t5);
        }
        let granted = (0..100).filter(|_| b.try_retry(&spec, t5)).count();
        assert_eq!(granted, 10);
        // Once the window has passed, the old requests and retries are gone.
        let t20 = t0 + Duration::from_secs(20);
        assert!(!b.try_retry(&spec, t20));
        for _ in 0..10 {
            b.record_request(t20);
        }
        assert_eq!((0..10).filter(|_| b.try_retry(&spec, t20)).count(), 2);
    }

    #[test]
    fn a_minimum_lets_low_traffic_retry() {
        let t0 = Instant::now();
        let b = RetryBudget::new(t0);
        let spec = spec(0.2, 3);
        b.record_request(t0);
        // 0.2 × 1 + 3/s × 10 s = 30.2 retries in the window.
        assert_eq!((0..100).filter(|_| b.try_retry(&spec, t0)).count(), 30);
    }

    #[test]
    fn only_safe_methods_are_retried_after_sending() {
        assert!(method_allows(&Method::GET, Outcome::Status(503)));
        assert!(method_allows(&Method::HEAD, Outcome::Error));
        assert!(!method_allows(&Method::POST, Outcome::Status(503)));
        assert!(!method_allows(&Method::PUT, Outcome::Timeout));
        assert!(method_allows(&Method::POST, Outcome::Connect));
    }
}
