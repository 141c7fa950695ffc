//! Active health checks: one background task per upstream that asks every replica for
//! `path` each `interval` (± 10 % jitter, so that many proxies do not check in step) and moves
//! replicas out of and back into the rotation.
//!
//! Replicas start healthy (optimistic). A replica that has never passed a check is ejected by
//! its first failed one; after that it takes `unhealthy_after` failures in a row to eject it and
//! `healthy_after` passes in a row to bring it back. The state lives in the replica, which a
//! reload carries over by URL, so a reload neither forgets an ejection nor re-checks from zero.

use super::{Replica, Upstream};
use http::{Request, header};
use http_body_util::BodyExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, Weak};
use std::time::Duration;

/// `[upstreams.NAME.health]`, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthSpec {
    /// Path (and query) asked with GET.
    pub path: http::uri::PathAndQuery,
    /// Time between rounds of checks.
    pub interval: Duration,
    /// Time a check has for its whole response.
    pub timeout: Duration,
    /// Statuses that pass, as inclusive ranges.
    pub expected_statuses: Vec<(u16, u16)>,
    /// Passes in a row that bring an ejected replica back.
    pub healthy_after: u32,
    /// Failures in a row that eject a replica.
    pub unhealthy_after: u32,
}

impl HealthSpec {
    /// Whether a check answered with `status` passes.
    pub fn passes(&self, status: u16) -> bool {
        self.expected_statuses
            .iter()
            .any(|&(lo, hi)| (lo..=hi).contains(&status))
    }
}

#[derive(Debug, Default)]
struct Streak {
    passes: u32,
    failures: u32,
    ever_passed: bool,
}

/// A replica's health as the checks see it.
#[derive(Debug)]
pub struct HealthState {
    healthy: AtomicBool,
    streak: Mutex<Streak>,
}

impl Default for HealthState {
    fn default() -> Self {
        HealthState {
            healthy: AtomicBool::new(true),
            streak: Mutex::new(Streak::default()),
        }
    }
}

impl HealthState {
    /// Whether the replica is in the rotation.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Records one check; returns the new health if it changed.
    pub fn observe(&self, spec: &HealthSpec, passed: bool) -> Option<bool> {
        let mut s = self.streak.lock().unwrap_or_else(|p| p.into_inner());
        if passed {
            s.passes += 1;
            s.failures = 0;
            s.ever_passed = true;
        } else {
            s.failures += 1;
            s.passes = 0;
        }
        let healthy = self.is_healthy();
        let next = if healthy && !passed && (!s.ever_passed || s.failures >= spec.unhealthy_after) {
            false
        } else if !healthy && passed && s.passes >= spec.healthy_after {
            true
        } else {
            return None;
        };
        self.healthy.store(next, Ordering::Relaxed);
        Some(next)
    }

    /// Puts the replica back in the rotation (the upstream no longer has checks).
    pub fn reset(&self) -> bool {
        *self.streak.lock().unwrap_or_else(|p| p.into_inner()) = Streak::default();
        !self.healthy.swap(true, Ordering::Relaxed)
    }
}

/// Runs the checks of an upstream until it is dropped.
pub(super) async fn run(upstream: Weak<Upstream>) {
    loop {
        let Some(u) = upstream.upgrade() else { return };
        let Some(spec) = u.spec.health.clone() else {
            return;
        };
        let checks = u.replicas.iter().map(|r| {
            let u = &u;
            let spec = &spec;
            async move {
                let passed = check(u, r, spec).await;
                u.health_observed(r, spec, passed);
            }
        });
        futures_util::future::join_all(checks).await;
        drop(u);
        let jitter = spec.interval.as_secs_f64() * (fastrand::f64() * 0.2 - 0.1);
        tokio::time::sleep(Duration::from_secs_f64(
            (spec.interval.as_secs_f64() + jitter).max(0.001),
        ))
        .await;
    }
}

async fn check(u: &Upstream, r: &Replica, spec: &HealthSpec) -> bool {
    let req = Request::get(http::Uri::from(spec.path.clone()))
        .header(header::HOST, r.authority.as_str())
        .header(header::USER_AGENT, "palisade-health-check")
        .body(crate::body::RequestBody::empty())
        .expect("valid request");
    let exchange = async {
        let resp = r.pool.send(req, u.spec.connect_timeout).await.ok()?;
        let status = resp.status().as_u16();
        resp.into_body().collect().await.ok()?;
        Some(status)
    };
    match tokio::time::timeout(spec.timeout, exchange).await {
        Ok(Some(status)) => spec.passes(status),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> HealthSpec {
        HealthSpec {
            path: "/health".parse().unwrap(),
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            expected_statuses: vec![(200, 399)],
            healthy_after: 2,
            unhealthy_after: 3,
        }
    }

    #[test]
    fn thresholds_eject_and_restore() {
        let spec = spec();
        let h = HealthState::default();
        assert!(h.is_healthy());
        assert_eq!(h.observe(&spec, true), None);
        assert_eq!(h.observe(&spec, false), None);
        assert_eq!(h.observe(&spec, false), None);
        assert_eq!(h.observe(&spec, false), Some(false));
        assert_eq!(h.observe(&spec, true), None);
        assert_eq!(h.observe(&spec, true), Some(true));
        assert!(spec.passes(302) && !spec.passes(500));
    }

    #[test]
    fn a_replica_that_never_passed_is_ejected_by_its_first_failure() {
        let h = HealthState::default();
        assert_eq!(h.observe(&spec(), false), Some(false));
        assert!(h.reset());
        assert!(h.is_healthy());
    }
}
