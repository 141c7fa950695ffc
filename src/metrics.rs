//! Every Prometheus metric Palisade exports, defined in one place (names as in DESIGN.md).

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry,
    TextEncoder,
};
use std::sync::{Arc, OnceLock};

/// Route label of requests that matched no route.
pub const NO_ROUTE: &str = "-";

/// Latency buckets in seconds, from 0.5 ms to 30 s.
const BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// The process's metrics and the registry that exports them.
pub struct Metrics {
    registry: Registry,
    /// Requests answered, by route, method and status code.
    pub requests: IntCounterVec,
    /// `requests` of requests that matched no route (route label "-").
    pub unrouted_requests: RequestCounters,
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
    /// 1 while a replica is in the rotation by its health checks, else 0.
    pub replica_healthy: IntGaugeVec,
    /// A replica's circuit: 0 closed, 1 half-open, 2 open.
    pub circuit_state: IntGaugeVec,
    /// Retries sent, by upstream.
    pub retries: IntCounterVec,
    /// Retries refused because the budget was spent, by upstream.
    pub retry_budget_exhausted: IntCounterVec,
    /// Replicas taken out of the rotation, by reason (health_check, circuit_open).
    pub ejections: IntCounterVec,
    /// Cache lookups, by route and result (hit, miss, stale, revalidated, bypass, coalesced).
    pub cache_lookups: IntCounterVec,
    /// URLs held by a cache tier.
    pub cache_entries: IntGaugeVec,
    /// Bytes held by a cache tier (bodies, headers and keys).
    pub cache_bytes: IntGaugeVec,
    /// Entries a cache tier evicted for space.
    pub cache_evictions: IntCounterVec,
    /// Stored URLs whose expiry time the memory tier's sweeper could not keep.
    pub cache_untracked_expiries: IntCounterVec,
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
        let requests = counter(
            "palisade_requests_total",
            "Requests answered, by route, method and status code.",
            &["route", "method", "code"],
        );
        let m = Metrics {
            unrouted_requests: RequestCounters::new(&requests, Arc::from(NO_ROUTE)),
            requests,
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
            replica_healthy: gauge(
                "palisade_replica_healthy",
                "1 while the replica is in the rotation by its health checks, else 0.",
                &["upstream", "replica"],
            ),
            circuit_state: gauge(
                "palisade_circuit_state",
                "The replica's circuit: 0 closed, 1 half-open, 2 open.",
                &["upstream", "replica"],
            ),
            retries: counter(
                "palisade_retries_total",
                "Requests sent again to another replica.",
                &["upstream"],
            ),
            retry_budget_exhausted: counter(
                "palisade_retry_budget_exhausted_total",
                "Retries not sent because the upstream's retry budget was spent.",
                &["upstream"],
            ),
            ejections: counter(
                "palisade_ejections_total",
                "Replicas taken out of the rotation, by reason (health_check, circuit_open).",
                &["upstream", "replica", "reason"],
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
                "Entries a cache tier evicted to stay within its budget (memory: also entries too large for their shard's share, never admitted).",
                &["tier"],
            ),
            cache_untracked_expiries: counter(
                "palisade_cache_untracked_expiries_total",
                "Expiry times the sweeper dropped (its bookkeeping was full): those entries are never served once expired, but leave only by eviction.",
                &["tier"],
            ),
            registry,
        };
        m.redis_errors.with_label_values(&["ratelimit"]);
        m.redis_errors.with_label_values(&["cache"]);
        m.cache_entries.with_label_values(&["memory"]);
        m.cache_bytes.with_label_values(&["memory"]);
        m.cache_evictions.with_label_values(&["memory"]);
        m.cache_untracked_expiries.with_label_values(&["memory"]);
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

/// The `method` label values, in [`method_index`] order.
const METHOD_LABELS: [&str; 10] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE", "OTHER",
];

fn method_index(m: &http::Method) -> usize {
    match *m {
        http::Method::GET => 0,
        http::Method::HEAD => 1,
        http::Method::POST => 2,
        http::Method::PUT => 3,
        http::Method::DELETE => 4,
        http::Method::PATCH => 5,
        http::Method::OPTIONS => 6,
        http::Method::CONNECT => 7,
        http::Method::TRACE => 8,
        _ => 9,
    }
}

/// A bounded label for a request method: the standard ones, or "OTHER".
pub fn method_label(m: &http::Method) -> &'static str {
    METHOD_LABELS[method_index(m)]
}

/// Status codes whose `palisade_requests_total` children [`RequestCounters`] keeps.
const KEPT_CODES: [u16; 27] = [
    200, 201, 202, 204, 206, 301, 302, 303, 304, 307, 308, 400, 401, 403, 404, 405, 409, 412, 413,
    416, 422, 429, 431, 500, 502, 503, 504,
];

/// `palisade_requests_total` for one route. Each (method, common code) child is looked up by
/// its labels on first use and then kept, so counting a request hashes no labels; a series
/// appears in the export only once a request has counted in it, as with a plain lookup.
pub struct RequestCounters {
    vec: IntCounterVec,
    route: Arc<str>,
    by_method: [OnceLock<Box<[OnceLock<IntCounter>]>>; METHOD_LABELS.len()],
}

impl RequestCounters {
    /// Counters of `vec` (`palisade_requests_total`) for the route label `route`.
    pub fn new(vec: &IntCounterVec, route: Arc<str>) -> RequestCounters {
        RequestCounters {
            vec: vec.clone(),
            route,
            by_method: Default::default(),
        }
    }

    /// The route label.
    pub fn route(&self) -> &Arc<str> {
        &self.route
    }

    /// Counts one answered request.
    pub fn inc(&self, method: &http::Method, status: http::StatusCode) {
        let m = method_index(method);
        let lookup = || {
            self.vec
                .with_label_values(&[&self.route, METHOD_LABELS[m], status.as_str()])
        };
        match KEPT_CODES.binary_search(&status.as_u16()) {
            Ok(c) => self.by_method[m]
                .get_or_init(|| KEPT_CODES.iter().map(|_| OnceLock::new()).collect())[c]
                .get_or_init(lookup)
                .inc(),
            Err(_) => lookup().inc(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{Method, StatusCode};

    #[test]
    fn kept_codes_are_sorted() {
        assert!(KEPT_CODES.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn request_counters_count_into_the_labelled_series() {
        let m = Metrics::new();
        let c = RequestCounters::new(&m.requests, Arc::from("r"));
        c.inc(&Method::GET, StatusCode::OK);
        c.inc(&Method::GET, StatusCode::OK);
        c.inc(
            &Method::from_bytes(b"PURGE").unwrap(),
            StatusCode::from_u16(599).unwrap(),
        );
        assert_eq!(m.requests.with_label_values(&["r", "GET", "200"]).get(), 2);
        assert_eq!(
            m.requests.with_label_values(&["r", "OTHER", "599"]).get(),
            1
        );
        let text = String::from_utf8(m.render()).unwrap();
        assert!(!text.contains("code=\"404\",method=\"GET\",route=\"r\""));
    }
}
