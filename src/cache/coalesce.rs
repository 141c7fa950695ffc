//! Request coalescing: the first miss for a key leads and goes upstream; concurrent misses for
//! the same key wait for the leader's response to be stored, then read it from the cache.
//!
//! The map holds one entry per key being fetched right now, so it is bounded by the requests in
//! flight, and hard-capped at [`MAX_FLIGHTS`] (past it, requests are not coalesced). It is split
//! into shards, each behind a short lock never held across an await.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex};
use tokio::sync::watch;

const SHARDS: usize = 64;
/// Most keys being fetched at once that can be waited on.
pub const MAX_FLIGHTS: usize = 100_000;

type Shard = Mutex<HashMap<String, watch::Receiver<()>>>;

/// The keys being fetched now.
pub struct Flights {
    shards: Arc<[Shard]>,
    hasher: foldhash::fast::FixedState,
    count: Arc<std::sync::atomic::AtomicUsize>,
}

/// The result of [`Flights::join`].
pub enum Joined {
    /// This request fetches; waiters are released when the guard drops.
    Leader(FlightGuard),
    /// Another request is fetching; wait on this.
    Follower(watch::Receiver<()>),
    /// Too many keys in flight: fetch without coalescing.
    Untracked,
}

/// Held by the leader of a key; dropping it (stored or not) releases the followers.
pub struct FlightGuard {
    shards: Arc<[Shard]>,
    shard: usize,
    key: String,
    tx: watch::Sender<()>,
    count: Arc<std::sync::atomic::AtomicUsize>,
}

impl Drop for FlightGuard {
    fn drop(&mut self) {
        let mut map = self.shards[self.shard]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if map
            .get(&self.key)
            .is_some_and(|rx| rx.same_channel(&self.tx.subscribe()))
        {
            map.remove(&self.key);
            self.count
                .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

impl Default for Flights {
    fn default() -> Self {
        Flights {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: foldhash::fast::FixedState::default(),
            count: Arc::default(),
        }
    }
}

impl Flights {
    /// Leads the fetch of `key`, or follows the one already running.
    pub fn join(&self, key: &str) -> Joined {
        let shard = self.hasher.hash_one(key) as usize % SHARDS;
        let mut map = self.shards[shard].lock().unwrap_or_else(|e| e.into_inner());
        if let Some(rx) = map.get(key) {
            return Joined::Follower(rx.clone());
        }
        if self.count.load(std::sync::atomic::Ordering::Relaxed) >= MAX_FLIGHTS {
            return Joined::Untracked;
        }
        let (tx, rx) = watch::channel(());
        map.insert(key.to_owned(), rx);
        self.count
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Joined::Leader(FlightGuard {
            shards: self.shards.clone(),
            shard,
            key: key.to_owned(),
            tx,
            count: self.count.clone(),
        })
    }

    /// Keys being fetched now.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.count.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether no key is being fetched.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Waits until the leader's guard drops, at most `timeout`; whether it did.
pub async fn wait(mut rx: watch::Receiver<()>, timeout: std::time::Duration) -> bool {
    tokio::time::timeout(timeout, rx.changed()).await.is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn one_leader_then_followers_are_released() {
        let f = Flights::default();
        let Joined::Leader(guard) = f.join("k") else {
            panic!("first is the leader")
        };
        let Joined::Follower(rx) = f.join("k") else {
            panic!("second follows")
        };
        assert!(matches!(f.join("other"), Joined::Leader(_)));
        assert_eq!(f.len(), 1, "the dropped leader of other is gone");
        let waiter = tokio::spawn(wait(rx, Duration::from_secs(5)));
        drop(guard);
        assert!(waiter.await.unwrap());
        assert!(f.is_empty());
        let Joined::Follower(rx) = ({
            let _g = f.join("k");
            f.join("k")
        }) else {
            panic!("follows while the leader lives")
        };
        assert!(
            wait(rx, Duration::from_millis(50)).await,
            "leader gone: released at once"
        );
        let Joined::Leader(_g) = f.join("k") else {
            panic!()
        };
        let Joined::Follower(rx) = f.join("k") else {
            panic!()
        };
        assert!(
            !wait(rx, Duration::from_millis(20)).await,
            "times out while the leader lives"
        );
    }
}
