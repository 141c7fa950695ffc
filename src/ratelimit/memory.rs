//! This instance's limiter state: one timestamp per (policy, client), in shards each behind its
//! own short lock (never held across an await), bounded in size.
//!
//! Bound: at most `max_keys` entries in all (default 1,000,000), each a pair of `u64` in a hash
//! table, about 40 bytes with the table's spare room, so 40 MB at most. Entries whose time has
//! passed are equivalent to absent (a full bucket) and are dropped by a sweep every 10 s; when a
//! shard is full, one entry gives way at once (a full bucket if one of the first few looked at
//! is, else a live one, which can only make a limit more lenient for that one client, never
//! stricter), so a flood of new clients costs each decision constant time.

use super::gcra::{Decision, Gcra};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

const SHARDS: usize = 64;

/// Keys are already keyed hashes; the table mixes them once more with a fixed-seed hasher.
type Table = HashMap<u64, u64, foldhash::fast::FixedState>;

/// Sharded, bounded GCRA state.
pub struct MemoryStore {
    epoch: Instant,
    shards: Box<[Mutex<Table>]>,
    per_shard: usize,
}

impl MemoryStore {
    /// A store holding at most `max_keys` clients.
    pub fn new(max_keys: usize) -> MemoryStore {
        MemoryStore {
            epoch: Instant::now(),
            shards: (0..SHARDS).map(|_| Mutex::new(Table::default())).collect(),
            per_shard: (max_keys / SHARDS).max(1),
        }
    }

    /// Nanoseconds since the store was made: the clock of [`MemoryStore::decide_at`].
    pub fn now(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// Decides a request for `key` now.
    pub fn decide(&self, key: u64, gcra: &Gcra) -> Decision {
        self.decide_at(key, gcra, self.now())
    }

    /// Decides a request for `key` at time `now` (nanoseconds on this store's clock).
    pub fn decide_at(&self, key: u64, gcra: &Gcra, now: u64) -> Decision {
        let shard = &self.shards[(key >> 58) as usize % SHARDS];
        let mut table = shard.lock().unwrap_or_else(|p| p.into_inner());
        let stored = table.get(&key).copied();
        let (decision, store) = gcra.decide(stored, now);
        if let Some(tat) = store {
            if stored.is_none() && table.len() >= self.per_shard {
                // Full: one entry gives way, in constant time (never a scan per request, so a
                // flood of new clients costs each decision no more): a full bucket among the
                // first few looked at, else the first of them.
                let victim = {
                    let mut first = None;
                    let mut idle = None;
                    for (k, t) in table.iter().take(8) {
                        first.get_or_insert(*k);
                        if *t <= now {
                            idle = Some(*k);
                            break;
                        }
                    }
                    idle.or(first)
                };
                if let Some(v) = victim {
                    table.remove(&v);
                }
            }
            table.insert(key, tat);
        }
        decision
    }

    /// Drops every entry whose bucket is full again.
    pub fn sweep(&self) {
        let now = self.now();
        for shard in self.shards.iter() {
            shard
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .retain(|_, t| *t > now);
        }
    }

    /// Entries held now.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).len())
            .sum()
    }

    /// Whether no entry is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The most entries this store holds.
    pub fn capacity(&self) -> usize {
        self.per_shard * SHARDS
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn bounded_under_a_million_clients() {
        let store = MemoryStore::new(10_000);
        let g = Gcra::new(1, Duration::from_secs(3600), 1);
        for i in 0..1_000_000u64 {
            let key = i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
            assert!(store.decide_at(key, &g, 0).allowed);
        }
        assert!(
            store.len() <= store.capacity(),
            "{} > {}",
            store.len(),
            store.capacity()
        );
    }

    #[test]
    fn sweep_forgets_full_buckets() {
        let store = MemoryStore::new(1000);
        let g = Gcra::new(1000, Duration::from_secs(1), 1);
        store.decide(1, &g);
        std::thread::sleep(Duration::from_millis(5));
        store.sweep();
        assert!(store.is_empty());
    }
}
