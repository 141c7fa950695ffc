//! Balancers: which of the candidate replicas (those available, see `Upstream::pick`) takes
//! the next request.

use super::Replica;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Each candidate in turn.
pub(super) fn round_robin(next: &AtomicUsize, candidates: &[usize]) -> Option<usize> {
    if candidates.is_empty() {
        return None;
    }
    Some(candidates[next.fetch_add(1, Ordering::Relaxed) % candidates.len()])
}

/// The candidate with the fewest requests in flight; ties go round-robin so that an idle
/// upstream still spreads its load.
pub(super) fn least_requests(
    next: &AtomicUsize,
    replicas: &[Arc<Replica>],
    candidates: &[usize],
) -> Option<usize> {
    let len = candidates.len();
    if len == 0 {
        return None;
    }
    let start = next.fetch_add(1, Ordering::Relaxed) % len;
    (0..len)
        .map(|step| candidates[(start + step) % len])
        .min_by_key(|&i| replicas[i].in_flight())
}

/// Power of two choices: of two random candidates, the one with the lower latency EWMA ×
/// (in flight + 1). A slow replica keeps a high EWMA and so gets little traffic; it is still
/// chosen when the faster one it is paired with is loaded, which refreshes its EWMA.
pub(super) fn p2c_ewma(replicas: &[Arc<Replica>], candidates: &[usize]) -> Option<usize> {
    match candidates.len() {
        0 => None,
        1 => Some(candidates[0]),
        n => {
            let a = fastrand::usize(..n);
            let b = (a + 1 + fastrand::usize(..n - 1)) % n;
            let (a, b) = (candidates[a], candidates[b]);
            let score = |i: usize| replicas[i].ewma_ms() * (replicas[i].in_flight() as f64 + 1.0);
            Some(if score(b) < score(a) { b } else { a })
        }
    }
}

/// Virtual nodes per replica on the hash ring.
const VNODES: usize = 160;

/// A consistent-hash ring: each replica at [`VNODES`] points; a key goes to the first
/// available replica clockwise from its hash, so a replica leaving moves only its own keys.
/// Points depend only on the replica URLs, so every Palisade instance builds the same ring.
#[derive(Debug)]
pub struct Ring {
    points: Vec<(u64, usize)>,
}

impl Ring {
    /// Builds the ring of `urls` (indices as given).
    pub fn new<S: AsRef<str>>(urls: &[S]) -> Ring {
        let mut points: Vec<(u64, usize)> = urls
            .iter()
            .enumerate()
            .flat_map(|(i, url)| {
                (0..VNODES).map(move |v| (hash(format!("{}#{v}", url.as_ref()).as_bytes()), i))
            })
            .collect();
        points.sort_unstable();
        Ring { points }
    }

    /// The replica for `key`: the first point clockwise whose replica `allowed` accepts.
    pub fn pick(&self, key: u64, allowed: impl Fn(usize) -> bool) -> Option<usize> {
        let start = self.points.partition_point(|&(h, _)| h < key);
        let n = self.points.len();
        (0..n)
            .map(|step| self.points[(start + step) % n].1)
            .find(|&i| allowed(i))
    }
}

/// A stable 64-bit hash (FNV-1a, then the splitmix64 finalizer for spread); the same in every
/// process and version, unlike the std hashers.
pub fn hash(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replica_leaving_moves_only_its_own_keys() {
        let urls: Vec<String> = (1..=4).map(|i| format!("http://10.0.0.{i}:80")).collect();
        let ring = Ring::new(&urls);
        let keys: Vec<u64> = (0..10_000u32).map(|k| hash(&k.to_be_bytes())).collect();
        let before: Vec<usize> = keys
            .iter()
            .map(|&k| ring.pick(k, |_| true).unwrap())
            .collect();
        let mut per = [0usize; 4];
        for &r in &before {
            per[r] += 1;
        }
        // 160 virtual nodes spread the keys within ±25 % of a fair share.
        assert!(per.iter().all(|&n| (1875..=3125).contains(&n)), "{per:?}");
        let after: Vec<usize> = keys
            .iter()
            .map(|&k| ring.pick(k, |i| i != 2).unwrap())
            .collect();
        let mut moved = 0;
        for (b, a) in before.iter().zip(&after) {
            if b != a {
                assert_eq!(*b, 2, "a key of another replica moved");
                moved += 1;
            }
            assert_ne!(*a, 2);
        }
        assert_eq!(moved, per[2]);
        assert_eq!(ring.pick(keys[0], |_| false), None);
    }

    #[test]
    fn round_robin_and_least_requests_keep_to_the_candidates() {
        let next = AtomicUsize::new(0);
        let picks: Vec<usize> = (0..4)
            .map(|_| round_robin(&next, &[0, 2]).unwrap())
            .collect();
        assert_eq!(picks, vec![0, 2, 0, 2]);
        assert_eq!(round_robin(&next, &[]), None);
    }
}
