//! The memory tier: a quick_cache cache (Clock-PRO eviction, weighted by size) of every
//! variant of a URL, bounded by `cache.memory` bytes. A URL's variants live together so that
//! invalidating the URL removes all of them with one key; each entry expires when its last
//! stale window ends.
//!
//! quick_cache rather than moka: a lookup is one read-locked probe of a shard's table and a
//! reference bit, where moka's also queues a read that its maintenance later replays (the
//! frequency sketch, a move in the access-order list). Over 100,000 URLs, whose entries are
//! out of the CPU's caches, that replay touched several more cold lines per hit; a lookup took
//! 1.65 µs against quick_cache's 0.8 µs (one key: 130 ns against 30 ns).
//!
//! Expiry is Palisade's own: each stored URL's expiry time goes to a queue that the
//! housekeeping thread ([`MemoryStore::sweep`]) works through at most [`SWEEP_BATCH`] entries
//! at a time, so that a wave of entries stored together and expiring together is removed
//! spread out; until then, an entry past its expiry is never served.

use super::key::CacheKey;
use super::policy::Freshness;
use crate::body::HeadLines;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use prometheus::IntCounter;
use quick_cache::sync::{EntryAction, EntryResult};
use std::collections::BTreeMap;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Most variants (distinct `Vary` values) kept per URL; the oldest is dropped past it.
pub const MAX_VARIANTS: usize = 8;
/// Memory a stored header takes beyond its name and value: its slot in the header map (the
/// bucket and index) and the value's share of the entry's allocation.
const HEADER_SLOT: usize = 128;
/// The shared encoded head's own allocation (its struct and reference counts).
const HEAD_LINES_OVERHEAD: usize = std::mem::size_of::<HeadLines>() + 16;
/// Memory a stored URL takes beyond its body and headers: the entry's structs and reference
/// counts, the cache's table slot, its key in the expiry queue, and allocator rounding.
const ENTRY_OVERHEAD: usize = 800;
/// The most shards the memory tier is split into (each has its own lock and its share of the
/// budget).
const MAX_SHARDS: u64 = 8;
/// The share of a shard's budget kept for its hot entries (quick_cache's hot allocation), which
/// is also the most an entry (a URL's variants) may weigh: a heavier one is refused (and the
/// store counts it as evicted). Fewer shards are used when one's share would not hold
/// [`MAX_VARIANTS`] of the largest bodies.
const ADMIT_PERCENT: u64 = 97;
/// The bytes per stored URL assumed to size the table at start (it grows past it).
const EXPECTED_URL_BYTES: u64 = 4096;
/// Longest a store waits for a concurrent store of the same URL (in the microseconds between
/// its lookup and its insert); past it, this store is skipped.
const ENTRY_WAIT: Duration = Duration::from_millis(1);

/// Most expired URLs one [`MemoryStore::sweep`] removes.
pub const SWEEP_BATCH: usize = 64;
/// Expiry times on their way from stores to the sweeper (it takes them every
/// [`super::HOUSEKEEPING_EVERY`]); past this many a store's time is dropped, and its entry
/// then leaves by eviction. A waiting time holds its URL's key bytes (about 60), also after
/// the entry was evicted, until the time comes. Only a URL's first store sends its time; the
/// sweep reschedules a URL that was stored again.
const EXPIRY_QUEUE: usize = 16 * 1024;
/// Memory the sweeper's key chunks may take; past this, new times are dropped (as above).
const MAX_DUE_BYTES: usize = 8 << 20;
/// The largest key chunk, and the first size of one (it doubles as it fills).
const CHUNK_BYTES: usize = 16 << 10;
const FIRST_CHUNK: usize = 256;
/// The sweeper's finest time resolution, for times within [`NEAR_MS`].
const BUCKET_MS: u64 = 1000;
const NEAR_MS: u64 = 64_000;

/// How long past its stale windows an entry with a validator is kept for revalidation.
pub const REVALIDATE_GRACE: Duration = Duration::from_secs(600);

/// One stored response, ready to serve: headers cleaned, validators extracted, body shared.
#[derive(Debug)]
pub struct CachedResponse {
    /// Status.
    pub status: StatusCode,
    /// Headers as they are served (no hop-by-hop, no Age).
    pub headers: HeaderMap,
    /// The whole body.
    pub body: Bytes,
    /// Freshness and stale windows.
    pub freshness: Freshness,
    /// The request header values that selected this variant (`None`: header absent).
    pub vary: Vec<(HeaderName, Option<HeaderValue>)>,
    /// `headers` encoded for HTTP/1.1, but for those [`SET_ON_HIT`] names.
    pub head: Arc<HeadLines>,
    /// Whether `headers` hold a RateLimit header (served from the header map: a rate-limited
    /// route replaces it).
    pub limit_headers: bool,
    /// [`CachedResponse::weight`], computed once: the cache weighs entries while it evicts.
    weight: usize,
}

/// Headers each hit sets itself (or a rate-limited route does), replacing a stored one: they
/// are left out of [`CachedResponse::head`].
const SET_ON_HIT: [&HeaderName; 5] = [
    &header::AGE,
    &super::CACHE_STATUS,
    &crate::proxy::headers::X_REQUEST_ID,
    &crate::proxy::headers::RATELIMIT,
    &crate::proxy::headers::RATELIMIT_POLICY,
];

/// [`CachedResponse::weight`] of these parts.
fn weigh(headers: &HeaderMap, body: &Bytes, vary: &[(HeaderName, Option<HeaderValue>)]) -> usize {
    let headers: usize = headers
        .iter()
        .map(|(k, v)| 2 * k.as_str().len() + v.len() + 4 + HEADER_SLOT)
        .sum();
    let vary: usize = vary
        .iter()
        .map(|(k, v)| k.as_str().len() + v.as_ref().map_or(0, |v| v.len()) + 64)
        .sum();
    body.len() + headers + vary + HEAD_LINES_OVERHEAD + ENTRY_OVERHEAD
}

impl CachedResponse {
    /// A stored response. Its header values are copied into one allocation of their own, the
    /// encoded head (values parsed from a connection are slices of its read buffer; stored as
    /// they are, each entry would keep a whole read buffer, 8 KiB or more, alive).
    pub fn new(
        status: StatusCode,
        headers: &HeaderMap,
        body: Bytes,
        freshness: Freshness,
        vary: Vec<(HeaderName, Option<HeaderValue>)>,
    ) -> Self {
        let (headers, head, limit_headers) = encode(headers);
        let weight = weigh(&headers, &body, &vary);
        CachedResponse {
            status,
            headers,
            body,
            freshness,
            vary,
            head: Arc::new(head),
            limit_headers,
            weight,
        }
    }

    /// Bytes it occupies, for the memory budget: the body, each header's name (in the map and
    /// in its encoded line) and value with the header map's own slot for it, and the fixed cost of an entry (its structs, the
    /// cache's bookkeeping for it, allocator rounding). The constants were measured: 48k
    /// entries of 1 KiB bodies with three headers took 2.4 KB each in RSS.
    pub fn weight(&self) -> usize {
        self.weight
    }

    /// Age in ms at `now_ms`.
    pub fn age_ms(&self, now_ms: u64) -> u64 {
        now_ms.saturating_sub(self.freshness.stored_at_ms)
    }

    /// Whether it is fresh at `now_ms`.
    pub fn is_fresh(&self, now_ms: u64) -> bool {
        self.age_ms(now_ms) < self.freshness.fresh_ms
    }

    /// Seconds of freshness left (negative once stale), for `Cache-Status: ttl=`.
    pub fn ttl_secs(&self, now_ms: u64) -> i64 {
        (self.freshness.fresh_ms as i64 - self.age_ms(now_ms) as i64).div_euclid(1000)
    }

    /// Whether it is stale but within `window_ms` past freshness.
    pub fn stale_within(&self, now_ms: u64, window_ms: u64) -> bool {
        let age = self.age_ms(now_ms);
        age >= self.freshness.fresh_ms && age < self.freshness.fresh_ms + window_ms
    }

    /// Unix ms after which no rule can use it any more. An entry with a validator is kept
    /// [`REVALIDATE_GRACE`] longer, so that a 304 can refresh it instead of a full fetch.
    pub fn useless_after_ms(&self) -> u64 {
        let f = &self.freshness;
        let grace = if self.etag().is_some() || self.last_modified().is_some() {
            REVALIDATE_GRACE.as_millis() as u64
        } else {
            0
        };
        f.stored_at_ms
            .saturating_add(f.fresh_ms)
            .saturating_add(f.swr_ms.max(f.sie_ms).max(grace))
    }

    /// Whether it may still be served or revalidated at `now_ms` (before
    /// [`Self::useless_after_ms`]); looks at its validators only past its stale windows.
    pub fn is_useful_at(&self, now_ms: u64) -> bool {
        let f = &self.freshness;
        let windows = f
            .stored_at_ms
            .saturating_add(f.fresh_ms)
            .saturating_add(f.swr_ms.max(f.sie_ms));
        now_ms < windows || now_ms < self.useless_after_ms()
    }

    /// Its ETag, if any.
    pub fn etag(&self) -> Option<&HeaderValue> {
        self.headers.get(header::ETAG)
    }

    /// Its Last-Modified, if any.
    pub fn last_modified(&self) -> Option<&HeaderValue> {
        self.headers.get(header::LAST_MODIFIED)
    }

    /// Whether this variant was selected by the same header values as `req` carries.
    pub fn selected_by(&self, req: &HeaderMap) -> bool {
        self.vary.iter().all(|(name, stored)| {
            let mut values = req.get_all(name).iter();
            match (stored, values.next()) {
                (None, None) => true,
                (Some(s), Some(v)) => values.next().is_none() && s == v,
                _ => false,
            }
        })
    }
}

/// `headers` with their values copied into one buffer that starts with their HTTP/1.1
/// lines; the lines leave out Content-Length, Transfer-Encoding, Connection and the
/// [`SET_ON_HIT`] names, whose values follow them in the buffer.
fn encode(headers: &HeaderMap) -> (HeaderMap, HeadLines, bool) {
    let in_lines = |name: &HeaderName| {
        !matches!(
            *name,
            header::CONTENT_LENGTH | header::TRANSFER_ENCODING | header::CONNECTION
        ) && !SET_ON_HIT.contains(&name)
    };
    let size: usize = headers
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + 4)
        .sum();
    let mut buf = Vec::with_capacity(size);
    // Each header with where its value starts in `buf`, in the order they are written.
    let mut placed = Vec::with_capacity(headers.len());
    let mut rest = Vec::new();
    let mut head = HeadLines::default();
    for (name, v) in headers {
        if !in_lines(name) {
            rest.push((name, v));
            continue;
        }
        buf.extend_from_slice(name.as_str().as_bytes());
        buf.extend_from_slice(b": ");
        placed.push((name, v, buf.len()));
        buf.extend_from_slice(v.as_bytes());
        buf.extend_from_slice(b"\r\n");
        head.date |= name == header::DATE;
    }
    let lines_end = buf.len();
    let mut limit_headers = false;
    for (name, v) in rest {
        placed.push((name, v, buf.len()));
        buf.extend_from_slice(v.as_bytes());
        if name == header::CONTENT_LENGTH {
            head.length = crate::framing::parse_length(v.as_bytes());
        }
        limit_headers |= name == crate::proxy::headers::RATELIMIT
            || name == crate::proxy::headers::RATELIMIT_POLICY;
    }
    let all = Bytes::from(buf);
    head.lines = all.slice(..lines_end);
    let mut out = HeaderMap::with_capacity(headers.len());
    for (name, v, at) in placed {
        // The bytes were a valid value a moment ago.
        let mut value = HeaderValue::from_maybe_shared(all.slice(at..at + v.len()))
            .unwrap_or_else(|_| v.clone());
        value.set_sensitive(v.is_sensitive());
        out.append(name.clone(), value);
    }
    (out, head, limit_headers)
}

/// A stored copy of a request header value that selected a variant, in an allocation of its
/// own (see [`CachedResponse::new`]).
pub fn own_value(v: &HeaderValue) -> HeaderValue {
    HeaderValue::from_bytes(v.as_bytes()).unwrap_or_else(|_| v.clone())
}

/// Every stored variant of one URL.
#[derive(Debug, Clone)]
pub struct Variants {
    /// The URL's key.
    pub key: CacheKey,
    /// Newest first.
    pub entries: Vec<Arc<CachedResponse>>,
}

impl Variants {
    fn weight(&self) -> u32 {
        let w: usize =
            2 * self.key.as_str().len() + self.entries.iter().map(|e| e.weight()).sum::<usize>();
        u32::try_from(w).unwrap_or(u32::MAX)
    }

    /// Unix ms after which none of its entries can be used.
    pub fn useless_after_ms(&self) -> u64 {
        self.entries
            .iter()
            .map(|e| e.useless_after_ms())
            .max()
            .unwrap_or(0)
    }

    /// A copy with `entry` added, replacing the variant with the same selecting values.
    pub fn with(&self, entry: Arc<CachedResponse>) -> Variants {
        let mut entries = Vec::with_capacity(self.entries.len() + 1);
        entries.push(entry.clone());
        entries.extend(
            self.entries
                .iter()
                .filter(|e| e.vary != entry.vary)
                .take(MAX_VARIANTS - 1)
                .cloned(),
        );
        Variants {
            key: self.key.clone(),
            entries,
        }
    }
}

/// What the memory tier holds for a request.
pub enum Found {
    /// A variant selected by the request's headers.
    Entry(Arc<CachedResponse>),
    /// The URL is stored, but not for these header values.
    VaryMiss,
    /// Nothing for the URL.
    None,
}

/// Weighs a URL's variants for the budget.
#[derive(Clone)]
struct VariantsWeight;

impl quick_cache::Weighter<Arc<str>, Arc<Variants>> for VariantsWeight {
    fn weight(&self, _: &Arc<str>, v: &Arc<Variants>) -> u64 {
        u64::from(v.weight())
    }
}

/// Counts the URLs the cache evicts to keep to its budget (and those too heavy to admit), and
/// holds them until the request that evicted them ends, so that they are freed after the
/// shard's lock is released.
#[derive(Clone)]
struct CountEvictions(IntCounter);

impl quick_cache::Lifecycle<Arc<str>, Arc<Variants>> for CountEvictions {
    type RequestState = Vec<Arc<Variants>>;

    fn begin_request(&self) -> Self::RequestState {
        Vec::new()
    }

    fn on_evict(&self, evicted: &mut Self::RequestState, _: Arc<str>, v: Arc<Variants>) {
        self.0.inc();
        evicted.push(v);
    }
}

type Table = quick_cache::sync::Cache<
    Arc<str>,
    Arc<Variants>,
    VariantsWeight,
    foldhash::quality::RandomState,
    CountEvictions,
>;

/// The memory tier.
pub struct MemoryStore {
    cache: Table,
    expiries: SyncSender<(u64, Arc<str>)>,
    sweeper: Mutex<Sweeper>,
    untracked: IntCounter,
}

/// The sweeper's side of the expiry queue. Keys are copied into buckets by when they expire,
/// as chunks of records (a length, then the bytes), so that the keys of URLs evicted before
/// they expire take little room and pin no allocations of their own. A bucket spans one
/// second for times within [`NEAR_MS`], and more (a power of two of seconds, about 1/64 of
/// the time left) for later ones, so that long windows make few buckets; a URL leaves at the
/// end of its bucket, which the sweep re-checks.
struct Sweeper {
    incoming: Receiver<(u64, Arc<str>)>,
    /// Chunks by the time their bucket ends, in Unix ms.
    due: BTreeMap<u64, Vec<Vec<u8>>>,
    /// The chunk being swept, and how far.
    current: Vec<u8>,
    at: usize,
    /// Bytes allocated for chunks (their capacity), `current` included.
    bytes: usize,
}

impl Sweeper {
    /// Files `key` to leave at `at` (Unix ms); dropped past [`MAX_DUE_BYTES`] (false).
    fn record(&mut self, at: u64, key: &str, now_ms: u64) -> bool {
        let Ok(len) = u16::try_from(key.len()) else {
            return false;
        };
        let need = key.len() + 2;
        let width = match at.saturating_sub(now_ms) {
            left if left <= NEAR_MS => BUCKET_MS,
            left => (left / 64).next_power_of_two().max(BUCKET_MS),
        };
        let end = at.div_ceil(width).saturating_mul(width);
        let bucket = self.due.entry(end).or_default();
        match bucket.last_mut() {
            Some(chunk) if chunk.len() + need <= CHUNK_BYTES.max(need) => {
                let before = chunk.capacity();
                if chunk.capacity() - chunk.len() < need
                    && self.bytes + before.max(need) > MAX_DUE_BYTES
                {
                    return false;
                }
                chunk.extend_from_slice(&len.to_le_bytes());
                chunk.extend_from_slice(key.as_bytes());
                self.bytes += chunk.capacity() - before;
            }
            _ => {
                let first = FIRST_CHUNK.max(need);
                if self.bytes + first > MAX_DUE_BYTES {
                    if bucket.is_empty() {
                        self.due.remove(&end);
                    }
                    return false;
                }
                let mut chunk = Vec::with_capacity(first);
                chunk.extend_from_slice(&len.to_le_bytes());
                chunk.extend_from_slice(key.as_bytes());
                self.bytes += chunk.capacity();
                bucket.push(chunk);
            }
        }
        true
    }
}

impl MemoryStore {
    /// A store of at most `budget` bytes for bodies of at most `largest`; size evictions
    /// count in `evictions`, expiry times the sweeper could not keep in `untracked`.
    pub fn new(budget: u64, largest: u64, evictions: IntCounter, untracked: IntCounter) -> Self {
        let heaviest = (MAX_VARIANTS as u64).saturating_mul(largest.saturating_add(64 << 10));
        let mut shards = MAX_SHARDS;
        while shards > 1 && budget / shards / 100 * ADMIT_PERCENT < heaviest {
            shards /= 2;
        }
        let options = quick_cache::OptionsBuilder::new()
            .shards(shards as usize)
            .weight_capacity(budget)
            .hot_allocation(ADMIT_PERCENT as f64 / 100.0)
            .estimated_items_capacity((budget / EXPECTED_URL_BYTES).clamp(1024, 1 << 20) as usize)
            .build()
            .expect("shards, weight and items are all set");
        let cache = Table::with_options(
            options,
            VariantsWeight,
            foldhash::quality::RandomState::default(),
            CountEvictions(evictions),
        );
        let (expiries, incoming) = sync_channel(EXPIRY_QUEUE);
        MemoryStore {
            cache,
            expiries,
            sweeper: Mutex::new(Sweeper {
                incoming,
                due: BTreeMap::new(),
                current: Vec::new(),
                at: 0,
                bytes: 0,
            }),
            untracked,
        }
    }

    /// Tells the sweeper when `key`'s variants expire.
    fn schedule(&self, key: Arc<str>, variants: &Variants) {
        if self
            .expiries
            .try_send((variants.useless_after_ms(), key))
            .is_err()
        {
            self.untracked.inc();
        }
    }

    /// Removes up to [`SWEEP_BATCH`] URLs whose variants are all past their last window at
    /// `now_ms`. A URL stored again since, or whose windows were extended, is kept and
    /// scheduled again for its new time. Returns whether more are due.
    pub fn sweep(&self, now_ms: u64) -> bool {
        let mut sweeper = self.sweeper.lock().unwrap_or_else(|e| e.into_inner());
        let sweeper = &mut *sweeper;
        while let Ok((at, key)) = sweeper.incoming.try_recv() {
            if !sweeper.record(at, &key, now_ms) {
                self.untracked.inc();
            }
        }
        let mut removed = 0;
        while removed < SWEEP_BATCH {
            if sweeper.at >= sweeper.current.len() {
                sweeper.bytes -= sweeper.current.capacity();
                sweeper.current = Vec::new();
                sweeper.at = 0;
                match sweeper.due.first_entry() {
                    Some(mut bucket) if *bucket.key() <= now_ms => {
                        sweeper.current = bucket.get_mut().pop().unwrap_or_default();
                        if bucket.get().is_empty() {
                            bucket.remove();
                        }
                    }
                    _ => return false,
                }
            }
            let at = sweeper.at;
            let len = usize::from(u16::from_le_bytes([
                sweeper.current[at],
                sweeper.current[at + 1],
            ]));
            sweeper.at = at + 2 + len;
            let Ok(key) = std::str::from_utf8(&sweeper.current[at + 2..at + 2 + len]) else {
                continue;
            };
            let mut later = None;
            let _ = self.cache.remove_if(key, |v| match v.useless_after_ms() {
                at if at <= now_ms => true,
                at => {
                    later = Some(at);
                    false
                }
            });
            if let Some(at) = later {
                let key = key.to_owned();
                if !sweeper.record(at, &key, now_ms) {
                    self.untracked.inc();
                }
            }
            removed += 1;
        }
        sweeper.at < sweeper.current.len()
            || sweeper
                .due
                .first_key_value()
                .is_some_and(|(&b, _)| b <= now_ms)
    }

    /// The variant stored for `key` that `req`'s headers select, unless all of the URL's
    /// variants are past their last window at `now_ms`.
    pub fn find(&self, key: &CacheKey, req: &HeaderMap, now_ms: u64) -> Found {
        let live = self
            .cache
            .get(key.as_str())
            .filter(|v| v.entries.iter().any(|e| e.is_useful_at(now_ms)));
        match live {
            None => Found::None,
            Some(v) => match v.entries.iter().find(|e| e.selected_by(req)) {
                Some(e) => Found::Entry(e.clone()),
                None => Found::VaryMiss,
            },
        }
    }

    /// Adds or replaces one variant; returns the URL's variants as now stored (`None`: not
    /// stored, as a concurrent store of the URL held it too long or an invalidation won).
    pub fn insert(&self, key: &CacheKey, entry: Arc<CachedResponse>) -> Option<Arc<Variants>> {
        self.upsert(key.as_str(), |old| match old {
            Some(old) => Arc::new(old.with(entry.clone())),
            None => Arc::new(Variants {
                key: key.clone(),
                entries: vec![entry.clone()],
            }),
        })
    }

    /// Stores what `make` builds from the URL's current variants, under the lock of the URL's
    /// shard (which serialises it with the sweep's check-and-remove of the same URL), and tells
    /// the sweeper when a URL new to the store expires; returns what it stored. The evictions
    /// that make room happen here, on the storing thread. `None`: not stored (a concurrent
    /// store of the URL held it past [`ENTRY_WAIT`], or an invalidation removed it meanwhile).
    fn upsert(
        &self,
        key: &str,
        make: impl Fn(Option<&Arc<Variants>>) -> Arc<Variants>,
    ) -> Option<Arc<Variants>> {
        let name: Arc<str> = Arc::from(key);
        let mut heavier = None;
        let stored = self.cache.entry(&name, Some(ENTRY_WAIT), |_, v| {
            let new = make(Some(v));
            if new.weight() > v.weight() {
                // Grown in place, the shard would not evict for it: it is re-admitted instead.
                heavier = Some(new);
                EntryAction::ReplaceWithGuard
            } else {
                // The old variants are returned, to be freed after the lock is released.
                EntryAction::Retain((std::mem::replace(v, new.clone()), new))
            }
        });
        match stored {
            EntryResult::Retained((_old, new)) => Some(new),
            EntryResult::Replaced(guard, _old) => {
                let new = heavier?;
                guard.insert(new.clone()).ok().map(|()| new)
            }
            EntryResult::Vacant(guard) => {
                let new = make(None);
                guard.insert(new.clone()).ok()?;
                self.schedule(name, &new);
                Some(new)
            }
            EntryResult::Removed(..) | EntryResult::Timeout => None,
        }
    }

    /// Stores all variants of a URL at once (a fill from the shared tier).
    pub fn fill(&self, variants: Arc<Variants>) {
        let _ = self.upsert(variants.key.as_str(), |_| variants.clone());
    }

    /// Removes a URL's variants; whether there were any.
    pub fn invalidate(&self, key: &str) -> bool {
        self.cache.remove(key).is_some()
    }

    /// Removes every URL whose key satisfies `pred`; how many.
    pub fn purge_if(&self, pred: impl Fn(&CacheKey) -> bool) -> usize {
        let doomed: Vec<Arc<str>> = self
            .cache
            .iter()
            .filter(|(_, v)| pred(&v.key))
            .map(|(k, _)| k)
            .collect();
        doomed
            .iter()
            .filter(|k| self.cache.remove(&**k).is_some())
            .count()
    }

    /// URLs stored and their weight in bytes.
    pub fn usage(&self) -> (u64, u64) {
        (self.cache.len() as u64, self.cache.weight())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_headers_are_encoded_once_without_the_ones_a_hit_sets() {
        let mut h = HeaderMap::new();
        h.append("content-type", HeaderValue::from_static("text/plain"));
        h.append("content-length", HeaderValue::from_static("4"));
        h.append(
            "date",
            HeaderValue::from_static("Tue, 01 Dec 2026 10:00:00 GMT"),
        );
        h.append("x-request-id", HeaderValue::from_static("old"));
        h.append("ratelimit", HeaderValue::from_static("limit=5"));
        h.append("via", HeaderValue::from_static("1.1 a"));
        h.append("via", HeaderValue::from_static("1.1 b"));
        let e = CachedResponse::new(
            StatusCode::OK,
            &h,
            Bytes::from_static(b"body"),
            Freshness {
                stored_at_ms: 0,
                fresh_ms: 1,
                swr_ms: 0,
                sie_ms: 0,
            },
            Vec::new(),
        );
        assert_eq!(
            &e.head.lines[..],
            &b"content-type: text/plain\r\ndate: Tue, 01 Dec 2026 10:00:00 GMT\r\n\
               via: 1.1 a\r\nvia: 1.1 b\r\n"[..]
        );
        assert_eq!(
            (e.head.length, e.head.date, e.limit_headers),
            (Some(4), true, true)
        );
        assert_eq!(e.headers, h, "the map keeps every stored header");
        let mut expected = h.clone();
        expected.remove("x-request-id");
        expected.remove("ratelimit");
        assert_eq!(e.head.to_map(), expected, "HTTP/2 gets the same lines back");
    }

    /// A 200 without headers, fresh for `fresh_ms` from `stored_at_ms`.
    fn response(
        stored_at_ms: u64,
        fresh_ms: u64,
        body: Bytes,
        vary: Vec<(HeaderName, Option<HeaderValue>)>,
    ) -> Arc<CachedResponse> {
        Arc::new(CachedResponse::new(
            StatusCode::OK,
            &HeaderMap::new(),
            body,
            Freshness {
                stored_at_ms,
                fresh_ms,
                swr_ms: 0,
                sie_ms: 0,
            },
            vary,
        ))
    }

    fn entry(stored_at_ms: u64, fresh_ms: u64) -> Arc<CachedResponse> {
        response(
            stored_at_ms,
            fresh_ms,
            Bytes::from_static(b"body"),
            Vec::new(),
        )
    }

    fn key(i: usize) -> CacheKey {
        CacheKey::from_parts(format!("r|h/{i}"), 3)
    }

    #[test]
    fn the_largest_body_is_admitted_and_the_budget_holds() {
        let evictions = IntCounter::new("e", "e").unwrap();
        // 8 shards of 512 KiB each would refuse a 1 MiB body; the store uses fewer.
        let store = MemoryStore::new(
            4 << 20,
            1 << 20,
            evictions.clone(),
            IntCounter::new("u", "u").unwrap(),
        );
        let now = super::super::policy::now_ms();
        let big = || response(now, 60_000, Bytes::from(vec![b'x'; 1 << 20]), Vec::new());
        store.insert(&key(0), big());
        assert!(matches!(
            store.find(&key(0), &HeaderMap::new(), now),
            Found::Entry(_)
        ));
        assert_eq!(evictions.get(), 0);
        for i in 1..12 {
            store.insert(&key(i), big());
            let (_, bytes) = store.usage();
            assert!(bytes <= 4 << 20, "{bytes} bytes stored after {i} MiB");
        }
        assert!(evictions.get() >= 8, "{} evictions", evictions.get());
    }

    #[test]
    fn a_url_growing_variants_is_held_to_the_budget() {
        let evictions = IntCounter::new("e", "e").unwrap();
        let store = MemoryStore::new(
            4 << 20,
            1 << 20,
            evictions.clone(),
            IntCounter::new("u", "u").unwrap(),
        );
        let now = super::super::policy::now_ms();
        let variant = |lang: &str| {
            let vary = HeaderValue::from_str(lang).unwrap();
            let vary = vec![(HeaderName::from_static("accept-language"), Some(vary))];
            response(now, 60_000, Bytes::from(vec![b'x'; 900 << 10]), vary)
        };
        store.insert(&key(1), entry(now, 60_000));
        for (i, lang) in ["da", "de", "en", "fr", "it", "nl"].iter().enumerate() {
            store.insert(&key(0), variant(lang));
            let (_, bytes) = store.usage();
            assert!(bytes <= 4 << 20, "{bytes} bytes after {} variants", i + 1);
        }
        assert!(evictions.get() >= 1, "storing past the budget evicted");
    }

    #[test]
    fn far_expiries_share_buckets_and_the_bookkeeping_is_bounded() {
        let (_tx, incoming) = sync_channel(1);
        let mut s = Sweeper {
            incoming,
            due: BTreeMap::new(),
            current: Vec::new(),
            at: 0,
            bytes: 0,
        };
        let now = 1_000_000_000;
        // One URL a second for a day of windows: few buckets, all of them counted.
        for i in 0..86_400u64 {
            assert!(s.record(now + i * 1000, &format!("r|h/{i}"), now));
        }
        assert!(s.due.len() < 1_000, "{} buckets", s.due.len());
        let allocated: usize = s.due.values().flatten().map(|c| c.capacity()).sum();
        assert_eq!(allocated, s.bytes);
        // Past the bound, new times are dropped.
        let kept = (0..1_000_000u64)
            .filter(|i| s.record(now + 5000, &format!("r|h/a/longer/key/{i}"), now))
            .count();
        assert!(kept < 1_000_000, "some times were refused");
        let allocated: usize = s.due.values().flatten().map(|c| c.capacity()).sum();
        assert_eq!(allocated, s.bytes);
        assert!(s.bytes <= MAX_DUE_BYTES, "{}", s.bytes);
        // A time past u64's reach is filed, not wrapped into the past.
        let _ = s.record(u64::MAX - 1, "r|h/far", now);
        assert!(s.due.keys().all(|&end| end >= now));
    }

    #[test]
    fn expired_urls_leave_a_batch_at_a_time_and_restored_ones_stay() {
        let store = MemoryStore::new(
            64 << 20,
            1 << 20,
            IntCounter::new("e", "e").unwrap(),
            IntCounter::new("u", "u").unwrap(),
        );
        let now = super::super::policy::now_ms();
        let n = SWEEP_BATCH * 3 + 10;
        for i in 0..n {
            store.insert(&key(i), entry(now - 10_000, 5_000));
        }
        // Stored again with a later expiry: its first, earlier time must not remove it.
        store.insert(&key(0), entry(now, 60_000));
        assert!(matches!(
            store.find(&key(0), &HeaderMap::new(), now),
            Found::Entry(_)
        ));
        assert!(
            matches!(store.find(&key(1), &HeaderMap::new(), now), Found::None),
            "expired entries are never found"
        );
        assert_eq!(
            store.usage().0,
            n as u64,
            "nothing is removed before a sweep"
        );

        let mut sweeps = 0;
        let mut left = vec![store.usage().0];
        while store.sweep(now) {
            sweeps += 1;
            left.push(store.usage().0);
            assert!(sweeps < 10);
        }
        left.push(store.usage().0);
        assert_eq!(sweeps, 3, "{left:?}");
        assert!(
            left.windows(2).all(|w| w[0] - w[1] <= SWEEP_BATCH as u64),
            "{left:?}"
        );
        assert_eq!(store.usage().0, 1, "{left:?}");
        assert_eq!(store.untracked.get(), 0, "every expiry time was kept");
        assert!(matches!(
            store.find(&key(0), &HeaderMap::new(), now),
            Found::Entry(_)
        ));
    }
}
