//! The running state: the config compiled into a [`Snapshot`] (router, routes, upstream pools)
//! behind an `ArcSwap`, and what lives as long as the process (metrics, request ids).
//!
//! A request loads the snapshot once and keeps it to the end, so in-flight requests finish on
//! the config they started with. A reload builds a new snapshot and carries over each upstream
//! whose spec did not change, with its connection pool, balancer state and health checks; a
//! changed upstream takes over each replica with an unchanged URL (health, circuit, EWMA). The
//! response cache lives in [`Shared`], so cached entries outlive reloads.

use crate::cache::{CachePolicy, RedisTier, ResponseCache};
use crate::config::{Config, RedisSettings};
use crate::metrics::{Metrics, RequestCounters};
use crate::ratelimit::{Policy, RateLimiter};
use crate::redis::Redis;
use crate::router::Router;
use crate::upstream::Upstream;
use arc_swap::ArcSwap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// A route as the request path needs it.
pub struct Route {
    /// Its name, shared into logs.
    pub name: Arc<str>,
    /// Index into [`Snapshot::upstreams`].
    pub upstream: usize,
    /// Its `palisade_requests_total` children.
    pub requests: RequestCounters,
    /// Its `palisade_request_duration_seconds` child.
    pub duration: prometheus::Histogram,
    /// Its rate-limit policy, if any.
    pub rate_limit: Option<Arc<Policy>>,
    /// Rate-limit decisions: allowed, limited.
    pub limit_decisions: [prometheus::IntCounter; 2],
    /// Its response-cache policy, if caching is on.
    pub cache: Option<Arc<CachePolicy>>,
}

/// One config, compiled.
pub struct Snapshot {
    /// The validated config.
    pub config: Arc<Config>,
    /// Route lookup.
    pub router: Router,
    /// Routes, in config order (the router's indices).
    pub routes: Vec<Route>,
    /// Upstreams, in config order.
    pub upstreams: Vec<Arc<Upstream>>,
    /// The Redis store of global rate limits, if configured.
    pub limit_redis: Option<Redis>,
    /// The cache's shared Redis tier, if configured.
    pub cache_redis: Option<RedisTier>,
}

impl Snapshot {
    /// Compiles a config, reusing upstreams of `previous` whose spec is unchanged.
    pub fn build(config: Config, previous: Option<&Snapshot>, metrics: &Metrics) -> Snapshot {
        let upstreams: Vec<Arc<Upstream>> = config
            .upstreams
            .iter()
            .map(|spec| {
                let same_name =
                    previous.and_then(|p| p.upstreams.iter().find(|u| u.spec.name == spec.name));
                match same_name {
                    Some(u) if u.spec == *spec => u.clone(),
                    other => Upstream::start(spec, other.map(|u| &**u), metrics),
                }
            })
            .collect();
        if let Some(p) = previous {
            forget_removed_replicas(p, &upstreams, metrics);
        }
        let policies: Vec<Arc<Policy>> = config
            .rate_limit_policies
            .iter()
            .map(|p| Arc::new(Policy::new(p.clone())))
            .collect();
        let routes = config
            .routes
            .iter()
            .map(|r| {
                let name: Arc<str> = r.name.as_str().into();
                Route {
                    requests: RequestCounters::new(&metrics.requests, name.clone()),
                    name,
                    upstream: r.upstream,
                    duration: metrics.request_duration.with_label_values(&[&r.name]),
                    rate_limit: r.rate_limit.map(|i| policies[i].clone()),
                    limit_decisions: ["allowed", "limited"]
                        .map(|d| metrics.ratelimit_decisions.with_label_values(&[&r.name, d])),
                    cache: r
                        .cache
                        .as_ref()
                        .map(|c| Arc::new(CachePolicy::new(&r.name, c.clone(), metrics))),
                }
            })
            .collect();
        let limit_redis = config.rate_limit.redis.as_ref().and_then(|s| {
            redis_for(
                s,
                previous.and_then(|p| p.limit_redis.as_ref()),
                "rate-limit",
            )
        });
        let cache_redis = config.cache.redis.as_ref().and_then(|s| {
            redis_for(
                s,
                previous
                    .and_then(|p| p.cache_redis.as_ref())
                    .map(|t| t.redis()),
                "cache",
            )
            .map(|r| RedisTier::new(r, config.cache.max_object_size))
        });
        Snapshot {
            router: Router::new(&config.routes),
            routes,
            upstreams,
            limit_redis,
            cache_redis,
            config: Arc::new(config),
        }
    }
}

/// Drops the gauges of replicas a reload removed, so that they do not linger as stale series.
fn forget_removed_replicas(previous: &Snapshot, now: &[Arc<Upstream>], metrics: &Metrics) {
    for old in &previous.upstreams {
        for r in &old.replicas {
            let kept = now
                .iter()
                .any(|u| u.spec.name == old.spec.name && u.replicas.iter().any(|n| n.url == r.url));
            if !kept {
                let labels = [old.spec.name.as_str(), &*r.url];
                let _ = metrics.replica_healthy.remove_label_values(&labels);
                let _ = metrics.circuit_state.remove_label_values(&labels);
            }
        }
    }
}

/// What every connection and request shares.
pub struct Shared {
    /// The current snapshot.
    pub snapshot: ArcSwap<Snapshot>,
    /// All metrics.
    pub metrics: Metrics,
    /// Set once the public listeners are bound.
    pub ready: AtomicBool,
    /// Rate-limit stores; the memory state outlives reloads.
    pub limiter: RateLimiter,
    /// The response cache's memory tier and in-flight fetches; outlives reloads
    /// (`cache.memory` and `cache.max_object_size` take effect at restart).
    pub cache: Arc<ResponseCache>,
    started: std::time::Instant,
    last_warning: AtomicU64,
    request_prefix: u64,
    request_counter: AtomicU64,
}

impl Shared {
    /// Builds the state for a validated config.
    pub fn new(config: Config) -> Arc<Shared> {
        let metrics = Metrics::new();
        let limiter = RateLimiter::new(config.rate_limit.max_keys);
        let cache = ResponseCache::new(config.cache.memory, config.cache.max_object_size, &metrics);
        let snapshot = Snapshot::build(config, None, &metrics);
        Arc::new(Shared {
            snapshot: ArcSwap::from_pointee(snapshot),
            metrics,
            ready: AtomicBool::new(false),
            limiter,
            cache,
            started: std::time::Instant::now(),
            last_warning: AtomicU64::new(0),
            request_prefix: fastrand::u64(..),
            request_counter: AtomicU64::new(0),
        })
    }

    /// Installs a validated config; in-flight requests keep the one they loaded.
    pub fn install(&self, config: Config) {
        let previous = self.snapshot.load();
        let next = Snapshot::build(config, Some(&previous), &self.metrics);
        self.snapshot.store(Arc::new(next));
    }

    /// Runs `log` at most once a second, so that a failing dependency cannot flood the log.
    pub fn warn_throttled(&self, log: impl FnOnce()) {
        let now = self.started.elapsed().as_secs() + 1;
        let last = self.last_warning.load(Ordering::Relaxed);
        if now > last
            && self
                .last_warning
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            log();
        }
    }

    /// A new request id: a random per-process prefix and a counter, 32 hex digits.
    pub fn next_request_id(&self) -> http::HeaderValue {
        let n = self.request_counter.fetch_add(1, Ordering::Relaxed);
        let mut buf = [0u8; 32];
        hex(self.request_prefix, &mut buf[..16]);
        hex(n, &mut buf[16..]);
        http::HeaderValue::from_bytes(&buf).expect("hex digits are a valid header value")
    }
}

fn hex(mut v: u64, out: &mut [u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for b in out.iter_mut().rev() {
        *b = DIGITS[(v & 0xf) as usize];
        v >>= 4;
    }
}

/// The Redis connection for `settings`: the previous snapshot's when it points at the same
/// place with the same timeout (so a reload keeps it), else a new one.
fn redis_for(settings: &RedisSettings, previous: Option<&Redis>, what: &str) -> Option<Redis> {
    if let Some(r) =
        previous.filter(|r| r.target == settings.target && r.timeout() == settings.timeout)
    {
        return Some(r.clone());
    }
    Redis::connect(&settings.target, settings.timeout)
        .inspect_err(|e| tracing::error!(error = %e, "cannot set up the {what} Redis"))
        .ok()
}
