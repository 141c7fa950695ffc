//! The circuit breaker of one replica, fed by live traffic.
//!
//! Closed: every request passes; the breaker trips (opens) after `consecutive_failures` in a
//! row, or when at least `min_requests` in the last `window` failed at `failure_rate` or more.
//! Open: nothing passes for `open_for`, doubled on each trip that follows a recent one (capped
//! at 10 × `open_for` or 5 min, whichever is shorter, but never below `open_for`). Half-open:
//! `half_open_requests` probes pass; all succeeding closes the circuit, one failing reopens it.
//!
//! Time is passed in (`now`), so tests drive the state machine without sleeping.

use super::OutcomeSet;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

/// `[upstreams.NAME.circuit_breaker]`, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct BreakerSpec {
    /// Failures in a row that trip the breaker.
    pub consecutive_failures: u32,
    /// Failed share (0 to 1) of the window's requests that trips the breaker.
    pub failure_rate: f64,
    /// Requests the window needs before `failure_rate` is judged.
    pub min_requests: u32,
    /// Span of the failure-rate window.
    pub window: Duration,
    /// Time the circuit stays open after a first trip.
    pub open_for: Duration,
    /// Probes let through while half-open.
    pub half_open_requests: u32,
    /// What counts as a failure.
    pub failure_on: OutcomeSet,
}

impl BreakerSpec {
    /// The longest an open period grows to.
    pub fn max_open_for(&self) -> Duration {
        (self.open_for * 10)
            .min(Duration::from_secs(300))
            .max(self.open_for)
    }
}

/// The state of a circuit; one spelling for logs, the metric and the admin JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CircuitState {
    /// Requests pass.
    Closed,
    /// A few probes pass.
    HalfOpen,
    /// Nothing passes.
    Open,
}

impl CircuitState {
    /// `closed`, `half_open` or `open`.
    pub fn as_str(self) -> &'static str {
        match self {
            CircuitState::Closed => "closed",
            CircuitState::HalfOpen => "half_open",
            CircuitState::Open => "open",
        }
    }

    /// The value of `palisade_circuit_state`: 0 closed, 1 half-open, 2 open.
    pub fn gauge(self) -> i64 {
        self as i64
    }

    fn from_u8(v: u8) -> CircuitState {
        match v {
            0 => CircuitState::Closed,
            1 => CircuitState::HalfOpen,
            _ => CircuitState::Open,
        }
    }
}

/// How a request was let through, to be handed back with its result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permit {
    /// Admitted while closed.
    Normal,
    /// One of the half-open probes.
    Probe,
    /// Admitted without asking (no breaker configured, or balancing in panic mode).
    Bypass,
}

const BUCKETS: usize = 10;

#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    epoch: u64,
    total: u32,
    failures: u32,
}

#[derive(Debug)]
struct Inner {
    state: CircuitState,
    origin: Instant,
    buckets: [Bucket; BUCKETS],
    consecutive: u32,
    trips: u32,
    open_until: Instant,
    last_closed: Instant,
    probes_started: u32,
    probe_successes: u32,
}

/// One replica's circuit breaker.
#[derive(Debug)]
pub struct CircuitBreaker {
    state: AtomicU8,
    inner: Mutex<Inner>,
}

impl CircuitBreaker {
    /// A closed breaker.
    pub fn new(now: Instant) -> CircuitBreaker {
        CircuitBreaker {
            state: AtomicU8::new(CircuitState::Closed as u8),
            inner: Mutex::new(Inner {
                state: CircuitState::Closed,
                origin: now,
                buckets: [Bucket::default(); BUCKETS],
                consecutive: 0,
                trips: 0,
                open_until: now,
                last_closed: now,
                probes_started: 0,
                probe_successes: 0,
            }),
        }
    }

    /// The state as last changed (an open circuit whose time is up still reads open until a
    /// request asks to pass).
    pub fn state(&self) -> CircuitState {
        CircuitState::from_u8(self.state.load(Ordering::Relaxed))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a request could pass now (without taking a probe slot).
    pub fn is_available(&self, spec: &BreakerSpec, now: Instant) -> bool {
        if self.state() == CircuitState::Closed {
            return true;
        }
        let inner = self.lock();
        match inner.state {
            CircuitState::Closed => true,
            CircuitState::Open => now >= inner.open_until,
            CircuitState::HalfOpen => inner.probes_started < spec.half_open_requests,
        }
    }

    /// Asks to let a request through: its permit, or `None`; and the new state if asking
    /// changed it (open → half-open).
    pub fn admit(
        &self,
        spec: &BreakerSpec,
        now: Instant,
    ) -> (Option<Permit>, Option<CircuitState>) {
        if self.state() == CircuitState::Closed {
            return (Some(Permit::Normal), None);
        }
        let mut inner = self.lock();
        let mut changed = None;
        if inner.state == CircuitState::Open && now >= inner.open_until {
            inner.state = CircuitState::HalfOpen;
            inner.probes_started = 0;
            inner.probe_successes = 0;
            changed = Some(CircuitState::HalfOpen);
        }
        let permit = match inner.state {
            CircuitState::Closed => Some(Permit::Normal),
            CircuitState::Open => None,
            CircuitState::HalfOpen if inner.probes_started < spec.half_open_requests => {
                inner.probes_started += 1;
                Some(Permit::Probe)
            }
            CircuitState::HalfOpen => None,
        };
        self.state.store(inner.state as u8, Ordering::Relaxed);
        (permit, changed)
    }

    /// A probe that ended without a result (the client went away): its slot frees.
    pub fn release(&self, permit: Permit) {
        if permit == Permit::Probe {
            let mut inner = self.lock();
            if inner.state == CircuitState::HalfOpen {
                inner.probes_started = inner.probes_started.saturating_sub(1);
            }
        }
    }

    /// Records a request's result; returns the new state if it changed.
    pub fn record(
        &self,
        spec: &BreakerSpec,
        permit: Permit,
        failed: bool,
        now: Instant,
    ) -> Option<CircuitState> {
        if permit == Permit::Bypass {
            return None;
        }
        let mut inner = self.lock();
        let changed = match (inner.state, permit) {
            (CircuitState::Closed, _) => {
                let width = (spec.window / BUCKETS as u32).max(Duration::from_millis(1));
                let epoch = (now.saturating_duration_since(inner.origin).as_nanos()
                    / width.as_nanos()) as u64;
                let b = &mut inner.buckets[epoch as usize % BUCKETS];
                if b.epoch != epoch {
                    *b = Bucket {
                        epoch,
                        total: 0,
                        failures: 0,
                    };
                }
                b.total += 1;
                b.failures += u32::from(failed);
                inner.consecutive = if failed { inner.consecutive + 1 } else { 0 };
                let (total, failures) = inner
                    .buckets
                    .iter()
                    .filter(|b| b.epoch + (BUCKETS as u64) > epoch && b.epoch <= epoch)
                    .fold((0u32, 0u32), |(t, f), b| (t + b.total, f + b.failures));
                let rate_trips = total >= spec.min_requests.max(1)
                    && f64::from(failures) >= spec.failure_rate * f64::from(total);
                if failed && (inner.consecutive >= spec.consecutive_failures || rate_trips) {
                    trip(&mut inner, spec, now);
                    Some(CircuitState::Open)
                } else {
                    None
                }
            }
            (CircuitState::HalfOpen, Permit::Probe) if failed => {
                trip(&mut inner, spec, now);
                Some(CircuitState::Open)
            }
            (CircuitState::HalfOpen, Permit::Probe) => {
                inner.probe_successes += 1;
                if inner.probe_successes >= spec.half_open_requests {
                    inner.state = CircuitState::Closed;
                    inner.consecutive = 0;
                    inner.buckets = [Bucket::default(); BUCKETS];
                    inner.last_closed = now;
                    Some(CircuitState::Closed)
                } else {
                    None
                }
            }
            // Results of requests admitted before the circuit opened say nothing new.
            _ => None,
        };
        self.state.store(inner.state as u8, Ordering::Relaxed);
        changed
    }

    /// Closes the circuit and forgets its history (the upstream no longer has a breaker).
    pub fn reset(&self, now: Instant) {
        *self.lock() = CircuitBreaker::new(now)
            .inner
            .into_inner()
            .unwrap_or_else(|p| p.into_inner());
        self.state
            .store(CircuitState::Closed as u8, Ordering::Relaxed);
    }

    /// When an open circuit lets probes through (`None` unless open).
    pub fn open_until(&self) -> Option<Instant> {
        let inner = self.lock();
        (inner.state == CircuitState::Open).then_some(inner.open_until)
    }
}

fn trip(inner: &mut Inner, spec: &BreakerSpec, now: Instant) {
    let max = spec.max_open_for();
    let recent = inner.state != CircuitState::Closed
        || now.saturating_duration_since(inner.last_closed) <= max;
    inner.trips = if recent && inner.trips > 0 {
        inner.trips + 1
    } else {
        1
    };
    let factor = 1u32 << (inner.trips - 1).min(16);
    let open_for = spec.open_for.saturating_mul(factor).min(max);
    inner.state = CircuitState::Open;
    inner.open_until = now + open_for;
    inner.probes_started = 0;
    inner.probe_successes = 0;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> BreakerSpec {
        BreakerSpec {
            consecutive_failures: 3,
            failure_rate: 0.5,
            min_requests: 10,
            window: Duration::from_secs(10),
            open_for: Duration::from_secs(1),
            half_open_requests: 2,
            failure_on: OutcomeSet::default(),
        }
    }

    fn s(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn consecutive_failures_open_then_half_open_then_close() {
        let spec = spec();
        let t0 = Instant::now();
        let b = CircuitBreaker::new(t0);
        assert_eq!(b.record(&spec, Permit::Normal, true, t0), None);
        assert_eq!(b.record(&spec, Permit::Normal, true, t0), None);
        assert_eq!(
            b.record(&spec, Permit::Normal, true, t0),
            Some(CircuitState::Open)
        );
        assert_eq!(b.state().as_str(), "open");
        assert!(!b.is_available(&spec, t0));
        assert_eq!(b.admit(&spec, t0 + Duration::from_millis(999)).0, None);
        // Time is up: half-open, two probes and no more.
        let t1 = t0 + s(1);
        assert!(b.is_available(&spec, t1));
        assert_eq!(
            b.admit(&spec, t1),
            (Some(Permit::Probe), Some(CircuitState::HalfOpen))
        );
        assert_eq!(b.admit(&spec, t1), (Some(Permit::Probe), None));
        assert_eq!(b.admit(&spec, t1).0, None);
        assert!(!b.is_available(&spec, t1));
        assert_eq!(b.record(&spec, Permit::Probe, false, t1), None);
        assert_eq!(
            b.record(&spec, Permit::Probe, false, t1),
            Some(CircuitState::Closed)
        );
        assert_eq!(b.admit(&spec, t1).0, Some(Permit::Normal));
    }

    #[test]
    fn a_failed_probe_reopens_for_twice_as_long_capped() {
        let spec = spec();
        let t0 = Instant::now();
        let b = CircuitBreaker::new(t0);
        for _ in 0..3 {
            b.record(&spec, Permit::Normal, true, t0);
        }
        assert_eq!(b.open_until(), Some(t0 + s(1)));
        let mut periods = Vec::new();
        for _ in 0..6 {
            let t = b.open_until().unwrap();
            assert_eq!(b.admit(&spec, t).0, Some(Permit::Probe));
            assert_eq!(
                b.record(&spec, Permit::Probe, true, t),
                Some(CircuitState::Open)
            );
            periods.push((b.open_until().unwrap() - t).as_secs());
        }
        assert_eq!(periods, vec![2, 4, 8, 10, 10, 10]);
        // A probe slot freed by a request that went away can be used again.
        let t = b.open_until().unwrap();
        assert_eq!(b.admit(&spec, t).0, Some(Permit::Probe));
        assert_eq!(b.admit(&spec, t).0, Some(Permit::Probe));
        assert_eq!(b.admit(&spec, t).0, None);
        b.release(Permit::Probe);
        assert_eq!(b.admit(&spec, t).0, Some(Permit::Probe));
    }

    #[test]
    fn failure_rate_needs_min_requests_within_the_window() {
        let spec = spec();
        let t0 = Instant::now();
        let b = CircuitBreaker::new(t0);
        // Alternating failures never reach 3 in a row; 9 requests are below min_requests.
        for i in 0..9 {
            b.record(&spec, Permit::Normal, i % 2 == 0, t0);
        }
        assert_eq!(b.state(), CircuitState::Closed);
        // Ten seconds later the old requests have left the window.
        let t1 = t0 + s(11);
        for i in 0..9 {
            assert_eq!(b.record(&spec, Permit::Normal, i % 2 == 1, t1), None);
        }
        // The tenth, a failure: 5 of 10 failed.
        assert_eq!(
            b.record(&spec, Permit::Normal, true, t1),
            Some(CircuitState::Open)
        );
    }

    #[test]
    fn late_results_and_bypass_do_not_move_the_state() {
        let spec = spec();
        let t0 = Instant::now();
        let b = CircuitBreaker::new(t0);
        for _ in 0..3 {
            b.record(&spec, Permit::Normal, true, t0);
        }
        assert_eq!(b.record(&spec, Permit::Normal, false, t0), None);
        assert_eq!(b.record(&spec, Permit::Bypass, false, t0), None);
        assert_eq!(b.state(), CircuitState::Open);
        assert_eq!(CircuitState::HalfOpen.gauge(), 1);
        assert_eq!(CircuitState::Open.gauge(), 2);
    }
}
