//! Upstreams: each a set of replicas, each with its own pool of keep-alive connections. Per replica: its health
//! from active checks ([`health`]), a circuit breaker fed by live traffic ([`breaker`]), its
//! in-flight count and latency EWMA. A balancer ([`balancer`]) picks among the available
//! replicas; [`Upstream::forward`] sends a request and retries it on another replica within the
//! retry budget ([`retry`]); timeouts turn a slow replica into a clear error.

mod balancer;
pub mod breaker;
pub mod h1;
pub mod health;
mod pool;
pub mod retry;

pub use balancer::Ring;
pub use breaker::{BreakerSpec, CircuitBreaker, CircuitState, Permit};
pub use health::{HealthSpec, HealthState};
pub use retry::{RetryBudget, RetrySpec};

use crate::body::{BodyError, RequestBody};
use crate::config::{Balance, HashOn, UpstreamSpec};
use crate::metrics::Metrics;
use h1::UpstreamBody;
use http::uri::Authority;
use pool::{Pool, PoolError};
use prometheus::{Histogram, IntCounter, IntGauge};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
/// Why a request to a replica failed.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// No connection could be opened (refused, unreachable, or past `connect_timeout`).
    #[error("cannot connect to {replica}: {reason}")]
    Connect {
        /// The replica's URL.
        replica: Arc<str>,
        /// What the connector said.
        reason: String,
    },
    /// No response head within `timeout`.
    #[error("{replica} did not answer within {timeout:?}")]
    Timeout {
        /// The replica's URL.
        replica: Arc<str>,
        /// The limit that passed.
        timeout: Duration,
    },
    /// The client's body went over `max_request_body` while being sent.
    #[error("request body exceeds the limit of {limit} bytes")]
    BodyTooLarge {
        /// The limit in bytes.
        limit: u64,
    },
    /// No replica is available (all unhealthy or with open circuits).
    #[error("upstream {upstream} has no replica available")]
    NoReplica {
        /// Upstream name.
        upstream: String,
        /// When one may be available again.
        retry_after: Duration,
    },
    /// The client's request body failed while being sent (broken framing, the client gone, or
    /// still waiting for the client's bytes when `timeout` passed): not the replica's doing.
    #[error("the client's request body failed: {reason}")]
    ClientBody {
        /// What went wrong.
        reason: String,
    },
    /// The exchange failed after connecting (reset, malformed response, closed early).
    #[error("{replica} failed: {reason}")]
    Failed {
        /// The replica's URL.
        replica: Arc<str>,
        /// What went wrong.
        reason: String,
    },
}

impl UpstreamError {
    /// The outcome the breaker and retries judge, or `None` for errors that are not the
    /// replica's doing.
    pub fn outcome(&self) -> Option<Outcome> {
        match self {
            UpstreamError::Connect { .. } => Some(Outcome::Connect),
            UpstreamError::Timeout { .. } => Some(Outcome::Timeout),
            UpstreamError::Failed { .. } => Some(Outcome::Error),
            UpstreamError::BodyTooLarge { .. }
            | UpstreamError::ClientBody { .. }
            | UpstreamError::NoReplica { .. } => None,
        }
    }
}

/// What one attempt at a replica came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// No connection could be opened: nothing was sent.
    Connect,
    /// No response head within `timeout`.
    Timeout,
    /// The exchange broke after connecting.
    Error,
    /// A response head with this status.
    Status(u16),
}

/// A set of outcomes, as written in `retry.on` and `circuit_breaker.failure_on`: `"connect"`,
/// `"timeout"`, `"error"`, `"5xx"`, or single statuses like `"503"`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct OutcomeSet {
    connect: bool,
    timeout: bool,
    error: bool,
    statuses: [u64; 10],
}

impl OutcomeSet {
    /// What the names allowed in config are.
    pub const ALLOWED: &str = "allowed are \"connect\", \"timeout\", \"error\", \"5xx\" and statuses from \"400\" to \"599\"";

    /// Builds a set from config names.
    pub fn from_names<'a>(names: impl IntoIterator<Item = &'a str>) -> Result<Self, String> {
        let mut s = OutcomeSet::default();
        for n in names {
            s.add(n)?;
        }
        Ok(s)
    }

    /// Adds one config name, or says why it is not one.
    pub fn add(&mut self, name: &str) -> Result<(), String> {
        match name.trim() {
            "connect" => self.connect = true,
            "timeout" => self.timeout = true,
            "error" => self.error = true,
            "5xx" => (500..=599).for_each(|s| self.set(s)),
            other => match other.parse::<u16>() {
                Ok(s) if (400..=599).contains(&s) => self.set(s),
                _ => return Err(format!("unknown outcome {other:?}: {}", Self::ALLOWED)),
            },
        }
        Ok(())
    }

    /// The set in config names, statuses ascending, with a full 500–599 range written "5xx".
    pub fn names(&self) -> Vec<String> {
        let mut out: Vec<String> = [
            (Outcome::Connect, "connect"),
            (Outcome::Timeout, "timeout"),
            (Outcome::Error, "error"),
        ]
        .into_iter()
        .filter(|(o, _)| self.contains(*o))
        .map(|(_, n)| n.to_owned())
        .collect();
        let all_5xx = (500..=599).all(|s| self.contains(Outcome::Status(s)));
        for s in 400..=599u16 {
            if all_5xx && s >= 500 {
                out.push("5xx".to_owned());
                break;
            }
            if self.contains(Outcome::Status(s)) {
                out.push(s.to_string());
            }
        }
        out
    }

    fn set(&mut self, status: u16) {
        self.statuses[usize::from(status / 64)] |= 1 << (status % 64);
    }

    /// Whether `o` is in the set.
    pub fn contains(&self, o: Outcome) -> bool {
        match o {
            Outcome::Connect => self.connect,
            Outcome::Timeout => self.timeout,
            Outcome::Error => self.error,
            Outcome::Status(s) => {
                s < 640 && self.statuses[usize::from(s / 64)] & (1 << (s % 64)) != 0
            }
        }
    }
}

/// One replica of an upstream, with the state that outlives reloads (carried over by URL).
pub struct Replica {
    /// Base URL, `http://host:port` or `https://host:port`.
    pub url: Arc<str>,
    upstream: Arc<str>,
    authority: Authority,
    pool: Arc<Pool>,
    in_flight: AtomicUsize,
    ewma_bits: AtomicU64,
    ewma_at: Mutex<Option<Instant>>,
    /// Health from active checks.
    pub health: HealthState,
    /// Circuit breaker from live traffic.
    pub breaker: CircuitBreaker,
    ok: IntCounter,
    connect_errors: IntCounter,
    timeouts: IntCounter,
    errors: IntCounter,
    duration: Histogram,
    healthy_gauge: IntGauge,
    circuit_gauge: IntGauge,
    ejected_by_health: IntCounter,
    ejected_by_circuit: IntCounter,
}

/// Time constant of the latency EWMA: a sample's weight halves in about 0.7 s.
const EWMA_TAU: Duration = Duration::from_secs(1);

impl Replica {
    fn new(spec: &UpstreamSpec, url: &str, metrics: &Metrics) -> Replica {
        let upstream = spec.name.as_str();
        let (authority, https) = match url.strip_prefix("https://") {
            Some(rest) => (rest, true),
            None => (url.strip_prefix("http://").unwrap_or(url), false),
        };
        let authority: Authority = authority.parse().expect("validated replica URL");
        let tls = spec
            .tls
            .as_ref()
            .filter(|_| https)
            .map(|t| t.connect_to(authority.host()));
        let outcome = |o: &str| {
            metrics
                .upstream_requests
                .with_label_values(&[upstream, url, o])
        };
        let ejected = |reason: &str| {
            metrics
                .ejections
                .with_label_values(&[upstream, url, reason])
        };
        let healthy_gauge = metrics.replica_healthy.with_label_values(&[upstream, url]);
        healthy_gauge.set(1);
        let circuit_gauge = metrics.circuit_state.with_label_values(&[upstream, url]);
        circuit_gauge.set(CircuitState::Closed.gauge());
        Replica {
            url: url.into(),
            upstream: upstream.into(),
            pool: Pool::new(authority.as_str(), tls),
            authority,
            in_flight: AtomicUsize::new(0),
            ewma_bits: AtomicU64::new(0),
            ewma_at: Mutex::new(None),
            health: HealthState::default(),
            breaker: CircuitBreaker::new(Instant::now()),
            ok: outcome("ok"),
            connect_errors: outcome("connect_error"),
            timeouts: outcome("timeout"),
            errors: outcome("error"),
            duration: metrics
                .upstream_duration
                .with_label_values(&[upstream, url]),
            healthy_gauge,
            circuit_gauge,
            ejected_by_health: ejected("health_check"),
            ejected_by_circuit: ejected("circuit_open"),
        }
    }

    /// Requests sent to this replica whose response has not ended.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Latency EWMA in milliseconds (0 before the first response).
    pub fn ewma_ms(&self) -> f64 {
        f64::from_bits(self.ewma_bits.load(Ordering::Relaxed))
    }

    /// Folds a latency sample into the EWMA: a slower sample is taken at once (peak EWMA, as
    /// Finagle's), a faster one is weighed by the time since the last sample.
    fn observe_latency(&self, sample: Duration, now: Instant) {
        let sample = sample.as_secs_f64() * 1000.0;
        let mut at = self.ewma_at.lock().unwrap_or_else(|p| p.into_inner());
        let old = self.ewma_ms();
        let next = match *at {
            None => sample,
            Some(_) if sample > old => sample,
            Some(t) => {
                let dt = now.saturating_duration_since(t).as_secs_f64();
                let w = (-dt / EWMA_TAU.as_secs_f64()).exp();
                old * w + sample * (1.0 - w)
            }
        };
        *at = Some(now);
        self.ewma_bits.store(next.to_bits(), Ordering::Relaxed);
    }

    /// Whether balancing may choose this replica: healthy, and its circuit not open.
    pub fn is_available(&self, spec: &UpstreamSpec, now: Instant) -> bool {
        self.health.is_healthy()
            && spec
                .circuit_breaker
                .as_ref()
                .is_none_or(|b| self.breaker.is_available(b, now))
    }

    fn circuit_changed(&self, to: CircuitState) {
        self.circuit_gauge.set(to.gauge());
        let (upstream, replica, circuit) = (&*self.upstream, &*self.url, to.as_str());
        match to {
            CircuitState::Open => {
                self.ejected_by_circuit.inc();
                tracing::warn!(
                    upstream,
                    replica,
                    circuit,
                    "circuit opened: replica ejected"
                );
            }
            CircuitState::HalfOpen => {
                tracing::info!(
                    upstream,
                    replica,
                    circuit,
                    "circuit half-open: probing replica"
                );
            }
            CircuitState::Closed => {
                tracing::info!(
                    upstream,
                    replica,
                    circuit,
                    "circuit closed: replica recovered"
                );
            }
        }
    }

    fn health_changed(&self, healthy: bool) {
        self.healthy_gauge.set(i64::from(healthy));
        let (upstream, replica) = (&*self.upstream, &*self.url);
        if healthy {
            tracing::info!(
                upstream,
                replica,
                healthy,
                "replica healthy again: back in rotation"
            );
        } else {
            self.ejected_by_health.inc();
            tracing::warn!(
                upstream,
                replica,
                healthy,
                "replica failed its health checks: ejected"
            );
        }
    }
}

/// Counts a request against its replica's in-flight total until dropped, and holds its
/// breaker permit until its result is recorded (a probe dropped unrecorded frees its slot).
pub struct InFlight {
    replica: Arc<Replica>,
    index: usize,
    permit: Option<Permit>,
}

impl InFlight {
    fn new(replica: Arc<Replica>, index: usize, permit: Permit) -> Self {
        replica.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight {
            replica,
            index,
            permit: Some(permit),
        }
    }

    /// The replica this request went to.
    pub fn replica(&self) -> &Arc<Replica> {
        &self.replica
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.replica.in_flight.fetch_sub(1, Ordering::Relaxed);
        if let Some(p) = self.permit.take() {
            self.replica.breaker.release(p);
        }
    }
}

/// A running upstream: its spec, replicas, balancer state, retry budget, connection pool and
/// health-check task.
pub struct Upstream {
    /// The config it was built from (compared on reload to keep unchanged upstreams).
    pub spec: UpstreamSpec,
    /// Its replicas, in config order.
    pub replicas: Vec<Arc<Replica>>,
    next: AtomicUsize,
    ring: Option<Ring>,
    budget: RetryBudget,
    retries: IntCounter,
    budget_exhausted: IntCounter,
    panicking: AtomicBool,
    health_task: Mutex<Option<tokio::task::AbortHandle>>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        if let Some(task) = self
            .health_task
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            task.abort();
        }
    }
}

impl Upstream {
    /// Builds an upstream with an empty connection pool, taking over the replicas (health,
    /// breaker, EWMA) of `previous` that have the same URL, and starts its health checks when
    /// it has any (inside a Tokio runtime).
    pub fn start(
        spec: &UpstreamSpec,
        previous: Option<&Upstream>,
        metrics: &Metrics,
    ) -> Arc<Upstream> {
        let now = Instant::now();
        // A replica's pool holds its TLS settings: when they changed, replicas start afresh.
        let previous = previous.filter(|p| p.spec.tls == spec.tls);
        let replicas: Vec<Arc<Replica>> = spec
            .replicas
            .iter()
            .map(|url| {
                previous
                    .and_then(|p| p.replicas.iter().find(|r| &*r.url == url.as_str()))
                    .cloned()
                    .unwrap_or_else(|| Arc::new(Replica::new(spec, url, metrics)))
            })
            .collect();
        for r in &replicas {
            if spec.health.is_none() && r.health.reset() {
                r.health_changed(true);
            }
            if spec.circuit_breaker.is_none() && r.breaker.state() != CircuitState::Closed {
                r.breaker.reset(now);
                r.circuit_changed(CircuitState::Closed);
            }
        }
        let ring = (spec.balance == Balance::ConsistentHash).then(|| Ring::new(&spec.replicas));
        let upstream = Arc::new(Upstream {
            spec: spec.clone(),
            replicas,
            next: AtomicUsize::new(0),
            ring,
            budget: RetryBudget::new(now),
            retries: metrics.retries.with_label_values(&[&spec.name]),
            budget_exhausted: metrics
                .retry_budget_exhausted
                .with_label_values(&[&spec.name]),
            panicking: AtomicBool::new(false),
            health_task: Mutex::new(None),
        });
        if spec.health.is_some()
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            let task = rt.spawn(health::run(Arc::downgrade(&upstream)));
            *upstream
                .health_task
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = Some(task.abort_handle());
        }
        upstream
    }

    fn health_observed(&self, r: &Replica, spec: &HealthSpec, passed: bool) {
        if let Some(healthy) = r.health.observe(spec, passed) {
            r.health_changed(healthy);
        }
    }

    /// The `consistent_hash` key of a request; `None` for other balancers.
    pub fn affinity(&self, client: IpAddr, headers: &http::HeaderMap) -> Option<u64> {
        if self.spec.balance != Balance::ConsistentHash {
            return None;
        }
        let value = match &self.spec.hash_on {
            HashOn::Header(name) => headers.get(name).map(|v| v.as_bytes()),
            HashOn::ClientIp => None,
        };
        Some(match value {
            Some(v) => balancer::hash(v),
            None => balancer::hash(client.to_string().as_bytes()),
        })
    }

    /// Whether more than `panic_threshold` of the replicas are unavailable now.
    pub fn in_panic(&self, now: Instant) -> bool {
        let n = self.replicas.len();
        let unavailable = self
            .replicas
            .iter()
            .filter(|r| !r.is_available(&self.spec, now))
            .count();
        self.spec
            .panic_threshold
            .is_some_and(|t| unavailable as f64 > t * n as f64)
    }

    /// Picks a replica not in `tried` for the next request and counts it in flight: among the
    /// available replicas, or among all of them in panic mode.
    pub fn pick(&self, affinity: Option<u64>, tried: &[usize]) -> Option<InFlight> {
        let now = Instant::now();
        let panic = self.in_panic(now);
        if self.panicking.swap(panic, Ordering::Relaxed) != panic {
            if panic {
                tracing::warn!(upstream = %self.spec.name, "too many replicas unavailable: balancing over all of them (panic mode)");
            } else {
                tracing::info!(upstream = %self.spec.name, "enough replicas available again: panic mode over");
            }
        }
        let mut candidates: Vec<usize> = (0..self.replicas.len())
            .filter(|i| !tried.contains(i))
            .filter(|&i| panic || self.replicas[i].is_available(&self.spec, now))
            .collect();
        loop {
            let i = match (self.spec.balance, &self.ring, affinity) {
                (Balance::ConsistentHash, Some(ring), Some(key)) => {
                    ring.pick(key, |i| candidates.contains(&i))
                }
                (Balance::LeastRequests, ..) => {
                    balancer::least_requests(&self.next, &self.replicas, &candidates)
                }
                (Balance::P2cEwma, ..) => balancer::p2c_ewma(&self.replicas, &candidates),
                _ => balancer::round_robin(&self.next, &candidates),
            }?;
            let r = &self.replicas[i];
            let permit = match &self.spec.circuit_breaker {
                Some(b) if !panic => {
                    let (permit, changed) = r.breaker.admit(b, now);
                    if let Some(to) = changed {
                        r.circuit_changed(to);
                    }
                    permit
                }
                _ => Some(Permit::Bypass),
            };
            match permit {
                Some(p) => return Some(InFlight::new(r.clone(), i, p)),
                None => candidates.retain(|&c| c != i),
            }
        }
    }

    /// How long until a replica may be available: the soonest circuit to half-open, else
    /// one health-check interval; at least a second.
    pub fn retry_after(&self) -> Duration {
        let now = Instant::now();
        let soonest = self
            .replicas
            .iter()
            .filter(|r| r.health.is_healthy())
            .filter_map(|r| r.breaker.open_until())
            .map(|t| t.saturating_duration_since(now))
            .min();
        let wait = soonest
            .or_else(|| self.spec.health.as_ref().map(|h| h.interval))
            .unwrap_or(Duration::from_secs(1));
        wait.max(Duration::from_secs(1))
    }

    /// Whether a request with these headers keeps its body for retries: retries are on and
    /// the body has a Content-Length up to `retry.max_body`.
    pub fn keeps_body(&self, headers: &http::HeaderMap) -> Option<u64> {
        let retry = self.spec.retry.as_ref()?;
        if headers.contains_key(http::header::TRANSFER_ENCODING) {
            return None;
        }
        let len: u64 = headers
            .get(http::header::CONTENT_LENGTH)?
            .to_str()
            .ok()?
            .parse()
            .ok()?;
        (len <= retry.max_body).then_some(len)
    }

    /// Sends `req` to a replica; on a failure in `retry.on`, sends it again to a replica not
    /// tried yet, up to `retry.attempts` times while the retry budget lasts, if the method
    /// allows it ([`retry::method_allows`]) and the body was kept. Returns the last answer.
    pub async fn forward(
        &self,
        req: http::Request<RequestBody>,
        affinity: Option<u64>,
    ) -> Result<(http::Response<UpstreamBody>, InFlight), UpstreamError> {
        self.budget.record_request(Instant::now());
        let (parts, body) = req.into_parts();
        let kept = body.replay();
        let mut body = Some(body);
        let method = parts.method.clone();
        // The head is copied only when a retry could need it again.
        let mut parts = Some(parts);
        let mut tried = Vec::new();
        let mut last = None;
        loop {
            let Some(mut in_flight) = self.pick(affinity, &tried) else {
                return last.unwrap_or_else(|| {
                    Err(UpstreamError::NoReplica {
                        upstream: self.spec.name.clone(),
                        retry_after: self.retry_after(),
                    })
                });
            };
            tried.push(in_flight.index);
            let attempt_body = body
                .take()
                .or_else(|| kept.as_ref().and_then(RequestBody::replay))
                .expect("a body that is not kept is sent once");
            let result = self
                .send(
                    &mut in_flight,
                    http::Request::from_parts(
                        if kept.is_some() && self.spec.retry.is_some() {
                            parts.clone().expect("kept while retries are possible")
                        } else {
                            parts.take().expect("sent once")
                        },
                        attempt_body,
                    ),
                )
                .await;
            let outcome = match &result {
                Ok(resp) => Some(Outcome::Status(resp.status().as_u16())),
                Err(e) => e.outcome(),
            };
            let answer = result.map(|resp| (resp, in_flight));
            let retryable = match (&self.spec.retry, outcome) {
                (Some(r), Some(o)) => {
                    kept.is_some()
                        && tried.len() <= r.attempts as usize
                        && tried.len() < self.replicas.len()
                        && r.on.contains(o)
                        && retry::method_allows(&method, o)
                }
                _ => false,
            };
            if !retryable {
                return answer;
            }
            let retry = self.spec.retry.as_ref().expect("retryable needs retry");
            if !self.budget.try_retry(retry, Instant::now()) {
                self.budget_exhausted.inc();
                return answer;
            }
            self.retries.inc();
            last = Some(answer);
        }
    }

    /// Sends `req` (origin-form URI) to the replica and waits up to `timeout` for the response
    /// head, then records the outcome in the replica's EWMA and breaker.
    async fn send(
        &self,
        in_flight: &mut InFlight,
        mut req: http::Request<RequestBody>,
    ) -> Result<http::Response<UpstreamBody>, UpstreamError> {
        let replica = in_flight.replica.clone();
        let replica = &*replica;
        if req.uri().scheme().is_some() || req.uri().path_and_query().is_none() {
            let path = req
                .uri()
                .path_and_query()
                .cloned()
                .unwrap_or(http::uri::PathAndQuery::from_static("/"));
            *req.uri_mut() = http::Uri::from(path);
        }
        let body_waiting = req.body().waiting();
        let started = Instant::now();
        let exchange = replica.pool.send(req, self.spec.connect_timeout);
        let exchanged = tokio::time::timeout(self.spec.timeout, exchange).await;
        let now = Instant::now();
        let took = now.saturating_duration_since(started);
        let result = match exchanged {
            Ok(Ok(resp)) => {
                replica.ok.inc();
                replica.duration.observe(took.as_secs_f64());
                Ok(resp)
            }
            Ok(Err(e)) => Err(Self::classify(replica, e)),
            Err(_)
                if body_waiting
                    .as_ref()
                    .is_some_and(|w| w.load(Ordering::Relaxed)) =>
            {
                Err(UpstreamError::ClientBody {
                    reason: format!("not sent within {:?}", self.spec.timeout),
                })
            }
            Err(_) => {
                replica.timeouts.inc();
                Err(UpstreamError::Timeout {
                    replica: replica.url.clone(),
                    timeout: self.spec.timeout,
                })
            }
        };
        let outcome = match &result {
            Ok(resp) => Some(Outcome::Status(resp.status().as_u16())),
            Err(e) => e.outcome(),
        };
        if let Some(o) = outcome {
            replica.observe_latency(took, now);
            if let (Some(spec), Some(permit)) =
                (&self.spec.circuit_breaker, in_flight.permit.take())
                && let Some(to) =
                    replica
                        .breaker
                        .record(spec, permit, spec.failure_on.contains(o), now)
            {
                replica.circuit_changed(to);
            }
        }
        result
    }

    fn classify(replica: &Replica, e: PoolError) -> UpstreamError {
        if let PoolError::Http(h1::H1Error::RequestBody(b)) = &e {
            match **b {
                BodyError::TooLarge { limit } => return UpstreamError::BodyTooLarge { limit },
                BodyError::Client(_) | BodyError::Transport(_) | BodyError::ClientStalled(_) => {
                    return UpstreamError::ClientBody {
                        reason: error_chain(&**b),
                    };
                }
                BodyError::UpstreamStalled(_) | BodyError::Upstream(_) => {}
            }
        }
        match e {
            PoolError::Connect(reason) => {
                replica.connect_errors.inc();
                UpstreamError::Connect {
                    replica: replica.url.clone(),
                    reason,
                }
            }
            PoolError::Http(e) => {
                replica.errors.inc();
                UpstreamError::Failed {
                    replica: replica.url.clone(),
                    reason: error_chain(&e),
                }
            }
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
