//! Balancers: which replica of an upstream takes the next request.

use super::Replica;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Each replica in turn.
pub(super) fn round_robin(next: &AtomicUsize, len: usize) -> Option<usize> {
    if len == 0 {
        return None;
    }
    Some(next.fetch_add(1, Ordering::Relaxed) % len)
}

/// The replica with the fewest requests in flight; ties go round-robin so that an idle
/// upstream still spreads its load.
pub(super) fn least_requests(next: &AtomicUsize, replicas: &[Arc<Replica>]) -> Option<usize> {
    let len = replicas.len();
    let start = round_robin(next, len)?;
    let mut best = start;
    let mut best_load = replicas[start].in_flight();
    for step in 1..len {
        let i = (start + step) % len;
        let load = replicas[i].in_flight();
        if load < best_load {
            best = i;
            best_load = load;
        }
    }
    Some(best)
}
