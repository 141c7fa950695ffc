//! The memory tier: a moka cache (TinyLFU admission, size-aware eviction) of every variant of
//! a URL, bounded by `cache.memory` bytes. A URL's variants live together so that invalidating
//! the URL removes all of them with one key; each entry expires when its last stale window ends.

use super::key::CacheKey;
use super::policy::Freshness;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use moka::notification::RemovalCause;
use prometheus::IntCounter;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Most variants (distinct `Vary` values) kept per URL; the oldest is dropped past it.
pub const MAX_VARIANTS: usize = 8;
/// Memory a stored header takes beyond its name and value: its slot in the header map (the
/// bucket and index) and the value's share of the entry's allocation.
const HEADER_SLOT: usize = 128;
/// Memory a stored URL takes beyond its body and headers: the entry's structs and reference
/// counts, the cache's hash-table slot, deque and timer nodes, its key twice over, and
/// allocator rounding.
const ENTRY_OVERHEAD: usize = 800;

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
}

impl CachedResponse {
    /// Bytes it occupies, for the memory budget: the body, each header's name and value with
    /// the header map's own slot for it, and the fixed cost of an entry (its structs, the
    /// cache's bookkeeping for it, allocator rounding). The constants were measured: 48k
    /// entries of 1 KiB bodies with three headers took 2.4 KB each in RSS.
    pub fn weight(&self) -> usize {
        let headers: usize = self
            .headers
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + HEADER_SLOT)
            .sum();
        let vary: usize = self
            .vary
            .iter()
            .map(|(k, v)| k.as_str().len() + v.as_ref().map_or(0, |v| v.len()) + 64)
            .sum();
        self.body.len() + headers + vary + ENTRY_OVERHEAD
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
        f.stored_at_ms + f.fresh_ms + f.swr_ms.max(f.sie_ms).max(grace)
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

/// A copy of `headers` whose values all live in one allocation of their own. Values parsed
/// by hyper are slices of its connection read buffer; stored as they are, each entry would
/// keep a whole read buffer (8 KiB or more) alive for as long as it is cached.
pub fn compact(headers: &HeaderMap) -> HeaderMap {
    let total: usize = headers.values().map(|v| v.len()).sum();
    let mut all = Vec::with_capacity(total);
    for v in headers.values() {
        all.extend_from_slice(v.as_bytes());
    }
    let all = Bytes::from(all);
    let mut out = HeaderMap::with_capacity(headers.len());
    let mut at = 0;
    for (name, v) in headers {
        let piece = all.slice(at..at + v.len());
        at += v.len();
        // The bytes were a valid value a moment ago.
        let mut value = HeaderValue::from_maybe_shared(piece).unwrap_or_else(|_| v.clone());
        value.set_sensitive(v.is_sensitive());
        out.append(name.clone(), value);
    }
    out
}

/// A stored copy of a request header value that selected a variant (see [`compact`]).
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

struct Expiry;

impl moka::Expiry<Arc<str>, Arc<Variants>> for Expiry {
    fn expire_after_create(&self, _: &Arc<str>, v: &Arc<Variants>, _: Instant) -> Option<Duration> {
        Some(Duration::from_millis(
            v.useless_after_ms().saturating_sub(super::policy::now_ms()),
        ))
    }
    fn expire_after_update(
        &self,
        _: &Arc<str>,
        v: &Arc<Variants>,
        _: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(Duration::from_millis(
            v.useless_after_ms().saturating_sub(super::policy::now_ms()),
        ))
    }
}

/// The memory tier.
pub struct MemoryStore {
    cache: moka::sync::Cache<Arc<str>, Arc<Variants>, foldhash::quality::RandomState>,
}

impl MemoryStore {
    /// A store of at most `budget` bytes; size evictions count in `evictions`.
    pub fn new(budget: u64, evictions: IntCounter) -> Self {
        let cache = moka::sync::Cache::builder()
            .max_capacity(budget)
            .weigher(|_, v: &Arc<Variants>| v.weight())
            .expire_after(Expiry)
            .eviction_listener(move |_, _, cause| {
                if cause == RemovalCause::Size {
                    evictions.inc();
                }
            })
            .build_with_hasher(foldhash::quality::RandomState::default());
        MemoryStore { cache }
    }

    /// The variant stored for `key` that `req`'s headers select.
    pub fn find(&self, key: &CacheKey, req: &HeaderMap) -> Found {
        match self.cache.get(key.as_str()) {
            None => Found::None,
            Some(v) => match v.entries.iter().find(|e| e.selected_by(req)) {
                Some(e) => Found::Entry(e.clone()),
                None => Found::VaryMiss,
            },
        }
    }

    /// Every variant of `key`.
    pub fn variants(&self, key: &CacheKey) -> Option<Arc<Variants>> {
        self.cache.get(key.as_str())
    }

    /// Adds or replaces one variant; returns the URL's variants as now stored.
    pub fn insert(&self, key: &CacheKey, entry: Arc<CachedResponse>) -> Arc<Variants> {
        let v = self
            .cache
            .entry(Arc::from(key.as_str()))
            .and_upsert_with(|old| match old {
                Some(old) => Arc::new(old.into_value().with(entry)),
                None => Arc::new(Variants {
                    key: key.clone(),
                    entries: vec![entry],
                }),
            })
            .into_value();
        self.settle();
        v
    }

    /// Applies pending evictions and expiries now: moka batches them, and a batch of large
    /// bodies stored before it runs would overshoot the byte budget.
    pub fn settle(&self) {
        self.cache.run_pending_tasks();
    }

    /// Stores all variants of a URL at once (a fill from the shared tier).
    pub fn fill(&self, variants: Arc<Variants>) {
        self.cache
            .insert(Arc::from(variants.key.as_str()), variants);
    }

    /// Removes a URL's variants; whether there were any.
    pub fn invalidate(&self, key: &str) -> bool {
        self.cache.remove(key).is_some()
    }

    /// Removes every URL whose key satisfies `pred`; how many.
    pub fn purge_if(&self, pred: impl Fn(&CacheKey) -> bool) -> usize {
        let doomed: Vec<Arc<Arc<str>>> = self
            .cache
            .iter()
            .filter(|(_, v)| pred(&v.key))
            .map(|(k, _)| k)
            .collect();
        doomed
            .iter()
            .filter(|k| self.cache.remove(&***k).is_some())
            .count()
    }

    /// URLs stored and their weight in bytes, as of the last housekeeping run.
    pub fn usage(&self) -> (u64, u64) {
        (self.cache.entry_count(), self.cache.weighted_size())
    }
}
