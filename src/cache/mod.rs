//! The response cache: per-route policy (RFC 9111 plus the route's TTLs), keys, a memory tier,
//! an optional Redis tier, request coalescing, stale serving and purge.
//!
//! The proxy calls it twice per request: [`ResponseCache::lookup`] before picking a replica
//! (answering hits, stale entries and conditional requests at once) and [`Pending::finish`]
//! on the upstream's response head (deciding whether to store it, tee-ing its body into a
//! [`Capture`] that stores the entry only when the body arrived whole). Freshness is decided
//! once at store time ([`policy`]); a hit compares precomputed numbers and clones `Bytes`.

mod coalesce;
pub mod key;
pub mod memory;
pub mod policy;
pub mod redis_tier;

pub use key::CacheKey;
pub use memory::{CachedResponse, MemoryStore};
pub use policy::MAX_VARY;
pub use redis_tier::RedisTier;

use crate::body::ResponseBody;
use crate::config::RouteCacheSpec;
use crate::metrics::Metrics;
use crate::proxy::headers;
use bytes::{Bytes, BytesMut};
use coalesce::{FlightGuard, Flights, Joined};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Response, StatusCode, header};
use memory::{Found, Variants};
use policy::{Freshness, RequestDirectives, RequestFacts, now_ms};
use prometheus::{IntCounter, IntGauge};
use std::sync::Arc;
use std::time::Duration;

/// `Cache-Status` (RFC 9211).
pub static CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");

/// What the cache did for one request: the metric label, the access-log field and the base of
/// `Cache-Status`, all from [`CacheResult::as_str`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheResult {
    /// Served fresh from the cache.
    Hit,
    /// Forwarded: nothing usable was stored.
    Miss,
    /// Served stale (while revalidating, or because the upstream failed).
    Stale,
    /// Forwarded with validators; the origin said 304 and the entry was served refreshed.
    Revalidated,
    /// Not a cacheable request (method), forwarded untouched.
    Bypass,
    /// Waited for another request's fetch of the same key and served its stored response.
    Coalesced,
}

impl CacheResult {
    /// Every result, in metric order.
    pub const ALL: [CacheResult; 6] = [
        CacheResult::Hit,
        CacheResult::Miss,
        CacheResult::Stale,
        CacheResult::Revalidated,
        CacheResult::Bypass,
        CacheResult::Coalesced,
    ];

    /// Its name.
    pub fn as_str(self) -> &'static str {
        match self {
            CacheResult::Hit => "hit",
            CacheResult::Miss => "miss",
            CacheResult::Stale => "stale",
            CacheResult::Revalidated => "revalidated",
            CacheResult::Bypass => "bypass",
            CacheResult::Coalesced => "coalesced",
        }
    }
}

/// Why the cache could not answer.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// `Cache-Control: only-if-cached` and nothing usable is stored (answered with 504).
    #[error("only-if-cached: the response is not in the cache")]
    NotCached,
}

/// A route's cache settings, compiled with its metric handles.
pub struct CachePolicy {
    /// The route's `cache = {...}`.
    pub spec: RouteCacheSpec,
    /// The route's name (part of every key).
    pub route: Arc<str>,
    lookups: [IntCounter; 6],
}

impl CachePolicy {
    /// Compiles a route's cache settings.
    pub fn new(route: &str, spec: RouteCacheSpec, metrics: &Metrics) -> Self {
        CachePolicy {
            lookups: CacheResult::ALL.map(|r| {
                metrics
                    .cache_lookups
                    .with_label_values(&[route, r.as_str()])
            }),
            spec,
            route: route.into(),
        }
    }

    /// Counts one lookup's result.
    pub fn count(&self, r: CacheResult) {
        self.lookups[r as usize].inc();
    }

    /// The key of a URL on this route.
    pub fn key(&self, host: &str, path: &str, query: Option<&str>) -> CacheKey {
        CacheKey::new(&self.route, host, path, query, &self.spec.query)
    }
}

/// The request facts a lookup needs.
pub struct CacheRequest<'a> {
    /// Method.
    pub method: &'a Method,
    /// Headers as the client sent them.
    pub headers: &'a HeaderMap,
    /// Normalized host.
    pub host: &'a str,
    /// Path.
    pub path: &'a str,
    /// Query, if any.
    pub query: Option<&'a str>,
}

/// A lookup's outcome.
pub enum Lookup {
    /// Answer now from the cache; `refresh`, when set, should be fetched in the background.
    Answer {
        /// The response.
        response: Box<Response<ResponseBody>>,
        /// What the cache did.
        result: CacheResult,
        /// A stale-while-revalidate refresh this request won the right to run.
        refresh: Option<Box<Pending>>,
    },
    /// Go upstream, then call [`Pending::finish`] with the response head.
    Forward(Box<Pending>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Miss,
    VaryMiss,
    ClientRevalidates,
    Stale,
    Unsafe,
    Refresh,
}

/// The process-wide cache: memory tier and in-flight fetches. Lives across reloads.
pub struct ResponseCache {
    memory: MemoryStore,
    flights: Flights,
    max_object_size: u64,
    entries: IntGauge,
    bytes: IntGauge,
    redis_errors: IntCounter,
}

/// How often the memory tier's housekeeping runs off the request path.
pub const HOUSEKEEPING_EVERY: std::time::Duration = std::time::Duration::from_millis(50);
/// The shortest pause between two sweeps of expired entries while more are due.
pub const SWEEP_PAUSE: std::time::Duration = std::time::Duration::from_millis(1);
/// While expired entries wait, the pause after a sweep is this many times the CPU time the
/// sweep took: the sweeper keeps to a tenth of a core (for sweeps under 5 ms, as pauses stop
/// at [`HOUSEKEEPING_EVERY`]), so that a wave of entries expiring together takes longer to
/// leave but never takes the workers' CPU in long bursts.
pub const SWEEP_PAUSE_FACTOR: u32 = 9;

/// CPU time the calling thread has used: what paces the sweeps (wall time would also count
/// the time the thread waited, throttled by a CPU quota or behind a worker on its core).
fn thread_cpu_time() -> std::time::Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_THREAD_CPUTIME_ID always exists on Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return std::time::Duration::ZERO;
    }
    std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

impl ResponseCache {
    /// A cache with `memory` bytes of budget; bodies over `max_object_size` are not stored.
    ///
    /// A thread of its own removes expired entries every [`HOUSEKEEPING_EVERY`], and while
    /// more wait a batch at a time, paced by [`SWEEP_PAUSE_FACTOR`], so that a wave of
    /// expiring entries is removed there, spread out, instead of in one long batch on a
    /// request's worker thread. At an earlier pace, 256 every 2 ms with moka as the store
    /// (whose removals cost about a third of a hit), a 100,000-URL wave under a 40% CPU quota
    /// doubled the one-URL hit p99 (9-10 ms to 17-18 ms). It runs at the workers' priority:
    /// a removal holds the lock of the URL's shard, which a worker storing into that shard
    /// waits for. It ends when the cache is dropped.
    pub fn new(memory: u64, max_object_size: u64, metrics: &Metrics) -> Arc<Self> {
        let cache = Arc::new(ResponseCache {
            memory: MemoryStore::new(
                memory,
                max_object_size,
                metrics.cache_evictions.with_label_values(&["memory"]),
                metrics
                    .cache_untracked_expiries
                    .with_label_values(&["memory"]),
            ),
            flights: Flights::default(),
            max_object_size,
            entries: metrics.cache_entries.with_label_values(&["memory"]),
            bytes: metrics.cache_bytes.with_label_values(&["memory"]),
            redis_errors: metrics.redis_errors.with_label_values(&["cache"]),
        });
        let weak = Arc::downgrade(&cache);
        let spawned = std::thread::Builder::new()
            .name("cache-housekeeping".into())
            .spawn(move || {
                while let Some(cache) = weak.upgrade() {
                    let started = thread_cpu_time();
                    let more = cache.memory.sweep(now_ms());
                    drop(cache);
                    std::thread::sleep(if more {
                        (thread_cpu_time().saturating_sub(started) * SWEEP_PAUSE_FACTOR)
                            .clamp(SWEEP_PAUSE, HOUSEKEEPING_EVERY)
                    } else {
                        HOUSEKEEPING_EVERY
                    });
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the cache housekeeping thread; expired entries will leave only by eviction");
        }
        cache
    }

    /// Largest body stored.
    pub fn max_object_size(&self) -> u64 {
        self.max_object_size
    }

    /// Refreshes the memory-tier gauges (called before /metrics is rendered).
    pub fn update_gauges(&self) {
        let (n, bytes) = self.memory.usage();
        self.entries.set(n as i64);
        self.bytes.set(bytes as i64);
    }

    fn redis_failed(&self, e: &crate::redis::RedisError) {
        self.redis_errors.inc();
        tracing::debug!(error = %e, "cache Redis failed; falling back");
    }

    /// Looks a request up. Waits at most `wait` for another request's fetch of the same key.
    pub async fn lookup(
        self: &Arc<Self>,
        policy: &Arc<CachePolicy>,
        tier: Option<&RedisTier>,
        req: CacheRequest<'_>,
        wait: Duration,
    ) -> Result<Lookup, CacheError> {
        let key = policy.key(req.host, req.path, req.query);
        let mut pending = Pending {
            cache: self.clone(),
            policy: policy.clone(),
            tier: tier.cloned(),
            key,
            mode: Mode::Miss,
            stale: None,
            guard: None,
            request: HeaderMap::new(),
            facts: RequestFacts {
                authorization: req.headers.contains_key(header::AUTHORIZATION),
                no_store: false,
            },
            head: *req.method == Method::HEAD,
        };
        if !matches!(*req.method, Method::GET | Method::HEAD) {
            pending.mode = Mode::Unsafe;
            return Ok(Lookup::Forward(Box::new(pending)));
        }
        let directives = RequestDirectives::parse(req.headers);
        pending.facts.no_store = directives.no_store;
        let mut now = now_ms();
        if directives.no_cache {
            pending.request = req.headers.clone();
            pending.mode = Mode::ClientRevalidates;
            if let Found::Entry(e) = self.memory.find(&pending.key, req.headers, now) {
                pending.stale = Some(e);
            }
            return Ok(Lookup::Forward(Box::new(pending)));
        }
        let mut found = self.memory.find(&pending.key, req.headers, now);
        let mut coalesced = false;
        for round in 0..2 {
            if let Some(answer) = self.answer(&pending, req.headers, &found, coalesced, now) {
                return Ok(answer);
            }
            if round == 1 {
                break;
            }
            if directives.only_if_cached {
                if let Some(tier) = tier
                    && matches!(found, Found::None)
                {
                    found = self.read_tier(tier, &pending.key, req.headers).await;
                    if let Some(answer) =
                        self.answer(&pending, req.headers, &found, false, now_ms())
                    {
                        return Ok(answer);
                    }
                }
                return Err(CacheError::NotCached);
            }
            match self.flights.join(pending.key.as_str()) {
                Joined::Leader(guard) => {
                    if let Some(tier) = tier
                        && matches!(found, Found::None)
                    {
                        found = self.read_tier(tier, &pending.key, req.headers).await;
                        if let Some(answer) =
                            self.answer(&pending, req.headers, &found, false, now_ms())
                        {
                            return Ok(answer);
                        }
                    }
                    pending.guard = Some(guard);
                    break;
                }
                Joined::Follower(rx) => {
                    coalesce::wait(rx, wait).await;
                    coalesced = true;
                    now = now_ms();
                    found = self.memory.find(&pending.key, req.headers, now);
                }
                Joined::Untracked => break,
            }
        }
        match found {
            Found::Entry(e) => {
                pending.mode = Mode::Stale;
                pending.stale = Some(e);
            }
            Found::VaryMiss => pending.mode = Mode::VaryMiss,
            Found::None => {}
        }
        pending.request = req.headers.clone();
        Ok(Lookup::Forward(Box::new(pending)))
    }

    async fn read_tier(&self, tier: &RedisTier, key: &CacheKey, req: &HeaderMap) -> Found {
        match tier.get(key).await {
            Ok(Some(v)) => {
                self.memory.fill(Arc::new(v));
                self.memory.find(key, req, now_ms())
            }
            Ok(None) => Found::None,
            Err(e) => {
                self.redis_failed(&e);
                Found::None
            }
        }
    }

    /// The answer a stored entry gives (fresh, or stale within stale_while_revalidate, with
    /// its background refresh); `None` when the request must go upstream.
    fn answer(
        &self,
        pending: &Pending,
        request: &HeaderMap,
        found: &Found,
        coalesced: bool,
        now: u64,
    ) -> Option<Lookup> {
        let Found::Entry(e) = found else { return None };
        if e.is_fresh(now) {
            let result = if coalesced {
                CacheResult::Coalesced
            } else {
                CacheResult::Hit
            };
            let status = hit_status(e.ttl_secs(now), if coalesced { "; collapsed" } else { "" });
            return Some(Lookup::Answer {
                response: Box::new(serve(e, request, pending.head, now, status)),
                result,
                refresh: None,
            });
        }
        if e.stale_within(now, e.freshness.swr_ms) {
            let refresh = match self.flights.join(pending.key.as_str()) {
                Joined::Leader(guard) => Some(Box::new(Pending {
                    cache: pending.cache.clone(),
                    policy: pending.policy.clone(),
                    tier: pending.tier.clone(),
                    key: pending.key.clone(),
                    mode: Mode::Refresh,
                    stale: Some(e.clone()),
                    guard: Some(guard),
                    request: request.clone(),
                    facts: pending.facts,
                    head: false,
                })),
                _ => None,
            };
            let status = hit_status(e.ttl_secs(now), "; detail=stale-while-revalidate");
            return Some(Lookup::Answer {
                response: Box::new(serve(e, request, pending.head, now, status)),
                result: CacheResult::Stale,
                refresh,
            });
        }
        None
    }

    /// Removes a URL from the memory tier and, when given, from Redis; how many tiers held it.
    pub async fn invalidate(&self, tier: Option<&RedisTier>, key: &CacheKey) -> u64 {
        let mut n = u64::from(self.memory.invalidate(key.as_str()));
        if let Some(tier) = tier {
            match tier.delete(&[redis_tier::redis_key(key)]).await {
                Ok(d) => n += d,
                Err(e) => self.redis_failed(&e),
            }
        }
        n
    }

    /// Purges what `target` names from both tiers.
    pub async fn purge(&self, tier: Option<&RedisTier>, target: &PurgeTarget) -> PurgeCount {
        let memory = match target {
            PurgeTarget::Key(k) => usize::from(self.memory.invalidate(k.as_str())),
            PurgeTarget::PathPrefix(p) => {
                self.memory.purge_if(|k| k.path().starts_with(p.as_str()))
            }
            PurgeTarget::Route(r) => self.memory.purge_if(|k| {
                k.as_str()
                    .strip_prefix(r.as_str())
                    .is_some_and(|rest| rest.starts_with(':'))
            }),
        } as u64;
        let mut redis = 0;
        let mut redis_error = None;
        if let Some(tier) = tier {
            let result = match target {
                PurgeTarget::Key(k) => tier.delete(&[redis_tier::redis_key(k)]).await,
                PurgeTarget::PathPrefix(p) => {
                    let pattern =
                        format!("{}*{}*", redis_tier::KEY_PREFIX, redis_tier::glob_escape(p));
                    tier.purge_matching(&pattern, |k| {
                        let rest = &k[redis_tier::KEY_PREFIX.len().min(k.len())..];
                        rest.match_indices(':').any(|(i, _)| {
                            let after = &rest[i + 1..];
                            after
                                .find('/')
                                .is_some_and(|j| after[j..].starts_with(p.as_str()))
                        })
                    })
                    .await
                }
                PurgeTarget::Route(r) => {
                    let pattern =
                        format!("{}{}:*", redis_tier::KEY_PREFIX, redis_tier::glob_escape(r));
                    tier.purge_matching(&pattern, |_| true).await
                }
            };
            match result {
                Ok(n) => redis = n,
                Err(e) => {
                    self.redis_failed(&e);
                    redis_error = Some(e.to_string());
                }
            }
        }
        PurgeCount {
            memory,
            redis,
            redis_error,
        }
    }

    fn store(&self, tier: Option<&RedisTier>, key: &CacheKey, entry: Arc<CachedResponse>) {
        if let Some(variants) = self.memory.insert(key, entry) {
            self.write_tier(tier, variants);
        }
    }

    fn write_tier(&self, tier: Option<&RedisTier>, variants: Arc<Variants>) {
        let Some(tier) = tier.cloned() else { return };
        let errors = self.redis_errors.clone();
        tokio::spawn(async move {
            if let Err(e) = tier.put(&variants, now_ms()).await {
                errors.inc();
                tracing::debug!(error = %e, "cache Redis write failed");
            }
        });
    }
}

/// What a purge removes.
#[derive(Debug, Clone)]
pub enum PurgeTarget {
    /// One URL (every variant).
    Key(CacheKey),
    /// Every URL whose path starts with this.
    PathPrefix(String),
    /// Every URL of a route.
    Route(String),
}

/// How much a purge removed.
#[derive(Debug, Clone, Default)]
pub struct PurgeCount {
    /// URLs removed from memory.
    pub memory: u64,
    /// Keys removed from Redis.
    pub redis: u64,
    /// Why Redis could not be purged, if it could not.
    pub redis_error: Option<String>,
}

/// Headers of a stored response that a 304 to a conditional request repeats (RFC 9110 §15.4.5).
const NOT_MODIFIED_HEADERS: [HeaderName; 6] = [
    header::CACHE_CONTROL,
    header::CONTENT_LOCATION,
    header::DATE,
    header::ETAG,
    header::EXPIRES,
    header::VARY,
];

/// Whether a client's conditional request is satisfied by `e` (so it gets a 304).
fn not_modified(e: &CachedResponse, req: &HeaderMap) -> bool {
    if let Some(inm) = req.get(header::IF_NONE_MATCH) {
        return e.etag().is_some_and(|t| policy::etag_matches(inm, t));
    }
    match (req.get(header::IF_MODIFIED_SINCE), e.last_modified()) {
        (Some(ims), Some(lm)) => policy::not_modified_since(ims, lm),
        _ => false,
    }
}

/// Headers a hit's map holds (Age, Cache-Status, X-Request-Id, Via and the two rate-limit
/// headers; the stored ones go as pre-encoded lines): room for them is made at once.
const HIT_EXTRA_HEADERS: usize = 6;

/// A response from a stored entry, with `Age` and `Cache-Status`; a 304 when the client's
/// conditional is satisfied; no body for HEAD.
fn serve(
    e: &CachedResponse,
    req: &HeaderMap,
    head: bool,
    now: u64,
    status_value: HeaderValue,
) -> Response<ResponseBody> {
    let age = age_value(e.age_ms(now) / 1000);
    if e.status == StatusCode::OK && not_modified(e, req) {
        let mut r = Response::new(ResponseBody::empty());
        *r.status_mut() = StatusCode::NOT_MODIFIED;
        let h = r.headers_mut();
        for name in &NOT_MODIFIED_HEADERS {
            for v in e.headers.get_all(name) {
                h.append(name, v.clone());
            }
        }
        if let Some(lm) = e.last_modified() {
            h.insert(header::LAST_MODIFIED, lm.clone());
        }
        h.insert(header::AGE, age);
        h.insert(&CACHE_STATUS, status_value);
        return r;
    }
    let body = if head {
        ResponseBody::empty()
    } else {
        ResponseBody::full(e.body.clone())
    };
    let mut r = Response::new(body.with_head(e.head.clone()));
    *r.status_mut() = e.status;
    let h = r.headers_mut();
    *h = HeaderMap::with_capacity(HIT_EXTRA_HEADERS);
    if e.limit_headers {
        for name in [&headers::RATELIMIT, &headers::RATELIMIT_POLICY] {
            for v in e.headers.get_all(name) {
                h.append(name, v.clone());
            }
        }
    }
    h.insert(header::AGE, age);
    h.insert(&CACHE_STATUS, status_value);
    r
}

/// The cache's part of a forwarded request, from lookup to the upstream's response.
pub struct Pending {
    cache: Arc<ResponseCache>,
    policy: Arc<CachePolicy>,
    tier: Option<RedisTier>,
    key: CacheKey,
    mode: Mode,
    stale: Option<Arc<CachedResponse>>,
    guard: Option<FlightGuard>,
    request: HeaderMap,
    facts: RequestFacts,
    head: bool,
}

/// What to do with an upstream response head.
pub enum Finish {
    /// Send it on as it is.
    Pass(CacheResult),
    /// Send it on, tee-ing its body into this capture.
    Store(CacheResult, Box<Capture>),
    /// Send this instead (a refreshed or stale entry); the upstream's response is dropped.
    Replace(Box<Response<ResponseBody>>, CacheResult),
}

impl Pending {
    /// The URL's key.
    pub fn key(&self) -> &CacheKey {
        &self.key
    }

    /// The client's request headers (for a background refresh).
    pub fn request_headers(&self) -> &HeaderMap {
        &self.request
    }

    /// Removes unkeyed override headers and, when revalidating a stored entry, replaces the
    /// client's conditionals with the entry's validators.
    pub fn prepare_upstream(&self, h: &mut HeaderMap) {
        for name in &key::UNKEYED_OVERRIDES {
            if h.contains_key(name) {
                h.remove(name);
            }
        }
        if let Some(e) = self.revalidating() {
            h.remove(header::IF_NONE_MATCH);
            h.remove(header::IF_MODIFIED_SINCE);
            if let Some(t) = e.etag() {
                h.insert(header::IF_NONE_MATCH, t.clone());
            }
            if let Some(lm) = e.last_modified() {
                h.insert(header::IF_MODIFIED_SINCE, lm.clone());
            }
        }
    }

    fn revalidating(&self) -> Option<&Arc<CachedResponse>> {
        self.stale
            .as_ref()
            .filter(|e| !self.head && (e.etag().is_some() || e.last_modified().is_some()))
    }

    /// A stale entry to serve instead of an upstream failure (stale-if-error), with the result
    /// to count.
    pub fn on_error(&self, upstream_status: Option<StatusCode>) -> Option<Response<ResponseBody>> {
        let e = self.stale.as_ref()?;
        let now = now_ms();
        let usable = e.stale_within(now, e.freshness.sie_ms)
            || (e.is_fresh(now) && self.mode == Mode::ClientRevalidates);
        if !usable {
            return None;
        }
        let status = match upstream_status {
            Some(s) => format!(
                "palisade; fwd=stale; fwd-status={}; ttl={}; detail=stale-if-error",
                s.as_u16(),
                e.ttl_secs(now)
            ),
            None => format!(
                "palisade; fwd=stale; ttl={}; detail=stale-if-error",
                e.ttl_secs(now)
            ),
        };
        Some(serve(
            e,
            &self.request,
            self.head,
            now,
            status_value(&status),
        ))
    }

    fn fwd(&self) -> &'static str {
        match self.mode {
            Mode::Miss => "miss",
            Mode::VaryMiss => "vary-miss",
            Mode::ClientRevalidates => "request",
            Mode::Stale | Mode::Refresh => "stale",
            Mode::Unsafe => "method",
        }
    }

    /// Decides what to do with the upstream's response head: invalidate (unsafe methods),
    /// serve a refreshed entry (304), serve stale (5xx within stale-if-error), or pass the
    /// response on and store it if the rules allow. `same_host_key` maps a Location or
    /// Content-Location path to the key it would be cached under.
    pub async fn finish(
        mut self: Box<Self>,
        parts: &mut http::response::Parts,
        same_host_key: impl Fn(&str) -> Option<CacheKey>,
    ) -> Finish {
        let status = parts.status;
        if self.mode == Mode::Unsafe {
            if status.is_success() || status.is_redirection() {
                self.cache.invalidate(self.tier.as_ref(), &self.key).await;
                for name in [header::LOCATION, header::CONTENT_LOCATION] {
                    if let Some(k) = parts
                        .headers
                        .get(&name)
                        .and_then(|v| v.to_str().ok())
                        .and_then(&same_host_key)
                    {
                        self.cache.invalidate(self.tier.as_ref(), &k).await;
                    }
                }
            }
            set_status(&mut parts.headers, "palisade; fwd=method");
            return Finish::Pass(CacheResult::Bypass);
        }
        if status.is_server_error()
            && let Some(r) = self.on_error(Some(status))
        {
            return Finish::Replace(Box::new(r), CacheResult::Stale);
        }
        let now = now_ms();
        if status == StatusCode::NOT_MODIFIED
            && let Some(e) = self.revalidating().cloned()
        {
            let mut headers = e.headers.clone();
            for (name, v) in parts.headers.iter() {
                if !matches!(
                    *name,
                    header::CONTENT_LENGTH | header::CONTENT_ENCODING | header::CONTENT_TYPE
                ) {
                    headers.insert(name, v.clone());
                }
            }
            headers.remove(header::AGE);
            let stored =
                match policy::decide(&self.policy.spec, self.facts, e.status, &headers, now) {
                    Ok(freshness) => {
                        let fresh = Arc::new(CachedResponse::new(
                            e.status,
                            &headers,
                            e.body.clone(),
                            freshness,
                            e.vary.clone(),
                        ));
                        self.cache
                            .store(self.tier.as_ref(), &self.key, fresh.clone());
                        fresh
                    }
                    Err(_) => {
                        self.cache.invalidate(self.tier.as_ref(), &self.key).await;
                        Arc::new(CachedResponse::new(
                            e.status,
                            &headers,
                            e.body.clone(),
                            Freshness {
                                stored_at_ms: now,
                                fresh_ms: 0,
                                swr_ms: 0,
                                sie_ms: 0,
                            },
                            e.vary.clone(),
                        ))
                    }
                };
            let cs = format!(
                "palisade; fwd={}; fwd-status=304; ttl={}",
                self.fwd(),
                stored.ttl_secs(now)
            );
            return Finish::Replace(
                Box::new(serve(
                    &stored,
                    &self.request,
                    self.head,
                    now,
                    status_value(&cs),
                )),
                CacheResult::Revalidated,
            );
        }
        let result = CacheResult::Miss;
        if self.head {
            set_status(&mut parts.headers, &format!("palisade; fwd={}", self.fwd()));
            return Finish::Pass(result);
        }
        let length = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|s| s.parse::<u64>().ok());
        let decided = if length.is_some_and(|n| n > self.cache.max_object_size) {
            None
        } else {
            policy::decide(&self.policy.spec, self.facts, status, &parts.headers, now)
                .and_then(|f| {
                    policy::vary_names(&parts.headers, &self.policy.spec.vary).map(|v| (f, v))
                })
                .inspect_err(|why| tracing::debug!(key = self.key.as_str(), %why, "not stored"))
                .ok()
        };
        let Some((freshness, vary)) = decided else {
            set_status(&mut parts.headers, &format!("palisade; fwd={}", self.fwd()));
            return Finish::Pass(result);
        };
        let mut headers = parts.headers.clone();
        headers.remove(header::AGE);
        let vary = vary
            .into_iter()
            .map(|name| {
                let mut values = self.request.get_all(&name).iter();
                let v = match (values.next(), values.next()) {
                    (Some(v), None) => Some(memory::own_value(v)),
                    (Some(v), Some(_)) => {
                        let joined: Vec<&[u8]> = self
                            .request
                            .get_all(&name)
                            .iter()
                            .map(|v| v.as_bytes())
                            .collect();
                        HeaderValue::from_bytes(&joined.join(&b", "[..]))
                            .ok()
                            .or(Some(memory::own_value(v)))
                    }
                    _ => None,
                };
                (name, v)
            })
            .collect();
        set_status(
            &mut parts.headers,
            &format!("palisade; fwd={}; stored", self.fwd()),
        );
        let capture = Capture {
            cache: self.cache.clone(),
            tier: self.tier.take(),
            key: self.key.clone(),
            status,
            headers,
            freshness,
            vary,
            expected: length,
            buf: BytesMut::with_capacity(length.unwrap_or(0) as usize),
            guard: self.guard.take(),
        };
        Finish::Store(result, Box::new(capture))
    }
}

fn set_status(h: &mut HeaderMap, v: &str) {
    h.insert(&CACHE_STATUS, status_value(v));
}

/// A `Cache-Status` value (`palisade` alone should one not be a valid header value).
fn status_value(v: &str) -> HeaderValue {
    HeaderValue::from_str(v).unwrap_or_else(|_| HeaderValue::from_static("palisade"))
}

/// The `Cache-Status` of a hit, `palisade; hit; ttl=N` and `suffix`, built in one exact-size
/// allocation: this runs on every hit.
fn hit_status(ttl: i64, suffix: &'static str) -> HeaderValue {
    let mut n = itoa::Buffer::new();
    crate::proxy::headers::value_of(&[
        b"palisade; hit; ttl=",
        n.format(ttl).as_bytes(),
        suffix.as_bytes(),
    ])
    .unwrap_or_else(|_| HeaderValue::from_static("palisade"))
}

/// Ages below this many seconds come from a table made once.
const AGE_TABLE: u64 = 3600;

/// An `Age` value: shared from a table for the first hour, else written once.
fn age_value(secs: u64) -> HeaderValue {
    static AGES: std::sync::LazyLock<Vec<HeaderValue>> =
        std::sync::LazyLock::new(|| (0..AGE_TABLE).map(HeaderValue::from).collect());
    match AGES.get(secs as usize) {
        Some(v) => v.clone(),
        None => HeaderValue::from(secs),
    }
}

/// A response body being copied into the cache as it streams to the client; stored only when
/// the body ended cleanly with the length its Content-Length promised and within
/// `max_object_size`. Dropping it unfinished stores nothing and releases coalesced waiters.
pub struct Capture {
    cache: Arc<ResponseCache>,
    tier: Option<RedisTier>,
    key: CacheKey,
    status: StatusCode,
    headers: HeaderMap,
    freshness: Freshness,
    vary: Vec<(HeaderName, Option<HeaderValue>)>,
    expected: Option<u64>,
    buf: BytesMut,
    guard: Option<FlightGuard>,
}

impl Capture {
    /// Copies a chunk; `false` once the body is too large to store (the capture is then
    /// useless and should be dropped).
    pub fn push(&mut self, data: &Bytes) -> bool {
        let len = self.buf.len() as u64 + data.len() as u64;
        if len > self.cache.max_object_size || self.expected.is_some_and(|n| len > n) {
            return false;
        }
        self.buf.extend_from_slice(data);
        true
    }

    /// The body ended cleanly: store it if its length is right.
    pub fn finish(self) {
        let Capture {
            cache,
            tier,
            key,
            status,
            headers,
            freshness,
            vary,
            expected,
            buf,
            guard,
        } = self;
        if expected.is_some_and(|n| n != buf.len() as u64) {
            return;
        }
        let entry = Arc::new(CachedResponse::new(
            status,
            &headers,
            buf.freeze(),
            freshness,
            vary,
        ));
        cache.store(tier.as_ref(), &key, entry);
        drop(guard);
    }
}
