//! Every Prometheus metric Palisade exports, defined in one place (names as in DESIGN.md).

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Latency buckets in seconds, from 0.5 ms to 30 s.
const BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// The process's metrics and the registry that exports them.
pub struct Metrics {
    registry: Registry,
    /// Requests answered, by route, method and status code.
    pub requests: IntCounterVec,
    /// Time from request head to response head, by route.
    pub request_duration: HistogramVec,
    /// Requests sent to replicas, by upstream, replica and outcome.
    pub upstream_requests: IntCounterVec,
    /// Time from sending to a replica to its response head.
    pub upstream_duration: HistogramVec,
    /// Open client connections, by listener.
    pub connections_active: IntGaugeVec,
    /// Config reloads, by result (ok, error).
    pub config_reloads: IntCounterVec,
    /// Always 1, labelled with the version.
    pub build_info: IntGaugeVec,
    /// Rate-limit decisions, by route and decision (allowed, limited).
    pub ratelimit_decisions: IntCounterVec,
    /// Redis commands that failed or timed out, by use (cache, ratelimit).
    pub redis_errors: IntCounterVec,
    /// Cache lookups, by route and result (hit, miss, stale, revalidated, bypass, coalesced).
    pub cache_lookups: IntCounterVec,
    /// URLs held by a cache tier.
    pub cache_entries: IntGaugeVec,
    /// Bytes held by a cache tier (bodies, headers and keys).
    pub cache_bytes: IntGaugeVec,
    /// Entries a cache tier evicted for space.
    pub cache_evictions: IntCounterVec,
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let histogram = |name: &str, help: &str, labels: &[&str]| {
            let h = HistogramVec::new(
                HistogramOpts::new(name, help).buckets(BUCKETS.to_vec()),
                labels,
            )
            .expect("valid metric");
            registry
                .register(Box::new(h.clone()))
                .expect("unique metric");
            h
        };
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let m = Metrics {
            requests: counter(
                "palisade_requests_total",
                "Requests answered, by route, method and status code.",
                &["route", "method", "code"],
            ),
            request_duration: histogram(
                "palisade_request_duration_seconds",
                "Time from a request's head to its response's head.",
                &["route"],
            ),
            upstream_requests: counter(
                "palisade_upstream_requests_total",
                "Requests sent to replicas, by outcome (ok, connect_error, timeout, error).",
                &["upstream", "replica", "outcome"],
            ),
            upstream_duration: histogram(
                "palisade_upstream_duration_seconds",
                "Time from sending a request to a replica to its response head.",
                &["upstream", "replica"],
            ),
            connections_active: gauge(
                "palisade_connections_active",
                "Open client connections.",
                &["listener"],
            ),
            config_reloads: counter(
                "palisade_config_reloads_total",
                "Config reloads, by result (ok, error).",
                &["result"],
            ),
            build_info: gauge(
                "palisade_build_info",
                "Always 1; labelled with the version.",
                &["version"],
            ),
            ratelimit_decisions: counter(
                "palisade_ratelimit_decisions_total",
                "Rate-limit decisions, by route and decision (allowed, limited).",
                &["route", "decision"],
            ),
            redis_errors: counter(
                "palisade_redis_errors_total",
                "Redis commands that failed or timed out, by use (cache, ratelimit).",
                &["use"],
            ),
            cache_lookups: counter(
                "palisade_cache_lookups_total",
                "Cache lookups, by route and result (hit, miss, stale, revalidated, bypass, coalesced).",
                &["route", "result"],
            ),
            cache_entries: gauge(
                "palisade_cache_entries",
                "URLs held by a cache tier (all their variants count as one).",
                &["tier"],
            ),
            cache_bytes: gauge(
                "palisade_cache_bytes",
                "Bytes held by a cache tier: bodies, headers and keys.",
                &["tier"],
            ),
            cache_evictions: counter(
                "palisade_cache_evictions_total",
                "Entries a cache tier evicted to stay within its budget.",
                &["tier"],
            ),
            registry,
        };
        m.redis_errors.with_label_values(&["ratelimit"]);
        m.redis_errors.with_label_values(&["cache"]);
        m.cache_entries.with_label_values(&["memory"]);
        m.cache_bytes.with_label_values(&["memory"]);
        m.cache_evictions.with_label_values(&["memory"]);
        m.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        for result in ["ok", "error"] {
            m.config_reloads.with_label_values(&[result]);
        }
        m
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 << 10);
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding cannot fail");
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// A bounded label for a request method: the standard ones, or "OTHER".
pub fn method_label(m: &http::Method) -> &'static str {
    match *m {
        http::Method::GET => "GET",
        http::Method::HEAD => "HEAD",
        http::Method::POST => "POST",
        http::Method::PUT => "PUT",
        http::Method::DELETE => "DELETE",
        http::Method::PATCH => "PATCH",
        http::Method::OPTIONS => "OPTIONS",
        http::Method::CONNECT => "CONNECT",
        http::Method::TRACE => "TRACE",
        _ => "OTHER",
    }
}
