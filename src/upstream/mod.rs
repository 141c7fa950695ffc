//! Upstreams: each a set of replicas behind one pooled HTTP client, with a balancer that picks
//! the replica for each request and the timeouts that turn a slow replica into a clear error.

mod balancer;

use crate::body::{BodyError, RequestBody};
use crate::config::{Balance, UpstreamSpec};
use crate::metrics::Metrics;
use http::uri::{Authority, Scheme};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use prometheus::{Histogram, IntCounter};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
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
    /// The exchange failed after connecting (reset, malformed response, closed early).
    #[error("{replica} failed: {reason}")]
    Failed {
        /// The replica's URL.
        replica: Arc<str>,
        /// What went wrong.
        reason: String,
    },
}

/// One replica of an upstream.
pub struct Replica {
    /// Base URL, `http://host:port`.
    pub url: Arc<str>,
    authority: Authority,
    in_flight: AtomicUsize,
    ok: IntCounter,
    connect_errors: IntCounter,
    timeouts: IntCounter,
    errors: IntCounter,
    duration: Histogram,
}

impl Replica {
    /// Requests sent to this replica whose response has not ended.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }
}

/// Counts a request against its replica's in-flight total until dropped.
pub struct InFlight(Arc<Replica>);

impl InFlight {
    fn new(r: Arc<Replica>) -> Self {
        r.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(r)
    }

    /// The replica this request went to.
    pub fn replica(&self) -> &Arc<Replica> {
        &self.0
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A running upstream: its spec, replicas, balancer state and connection pool.
pub struct Upstream {
    /// The config it was built from (compared on reload to keep unchanged upstreams).
    pub spec: UpstreamSpec,
    /// Its replicas, in config order.
    pub replicas: Vec<Arc<Replica>>,
    next: AtomicUsize,
    client: Client<HttpConnector, RequestBody>,
}

impl Upstream {
    /// Builds an upstream with an empty connection pool.
    pub fn new(spec: &UpstreamSpec, metrics: &Metrics) -> Upstream {
        let replicas = spec
            .replicas
            .iter()
            .map(|url| {
                let authority: Authority = url
                    .strip_prefix("http://")
                    .unwrap_or(url)
                    .parse()
                    .expect("validated replica URL");
                let outcome = |o: &str| {
                    metrics
                        .upstream_requests
                        .with_label_values(&[&spec.name, url, o])
                };
                Arc::new(Replica {
                    url: url.as_str().into(),
                    authority,
                    in_flight: AtomicUsize::new(0),
                    ok: outcome("ok"),
                    connect_errors: outcome("connect_error"),
                    timeouts: outcome("timeout"),
                    errors: outcome("error"),
                    duration: metrics
                        .upstream_duration
                        .with_label_values(&[&spec.name, url]),
                })
            })
            .collect();
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(spec.connect_timeout));
        connector.set_keepalive(Some(Duration::from_secs(60)));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(1024)
            .pool_timer(hyper_util::rt::TokioTimer::new())
            .timer(hyper_util::rt::TokioTimer::new())
            .build(connector);
        Upstream {
            spec: spec.clone(),
            replicas,
            next: AtomicUsize::new(0),
            client,
        }
    }

    /// Picks the replica for the next request and counts it in flight.
    pub fn pick(&self) -> Option<InFlight> {
        let i = match self.spec.balance {
            Balance::RoundRobin => balancer::round_robin(&self.next, self.replicas.len()),
            Balance::LeastRequests => balancer::least_requests(&self.next, &self.replicas),
        }?;
        Some(InFlight::new(self.replicas[i].clone()))
    }

    /// Sends `req` (origin-form URI) to the replica and waits up to `timeout` for the response
    /// head.
    pub async fn send(
        &self,
        replica: &Replica,
        mut req: http::Request<RequestBody>,
    ) -> Result<http::Response<Incoming>, UpstreamError> {
        let mut parts = std::mem::take(req.uri_mut()).into_parts();
        parts.scheme = Some(Scheme::HTTP);
        parts.authority = Some(replica.authority.clone());
        if parts.path_and_query.is_none() {
            parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
        }
        *req.uri_mut() = http::Uri::from_parts(parts).expect("scheme, authority and path are set");
        let started = Instant::now();
        let result = tokio::time::timeout(self.spec.timeout, self.client.request(req)).await;
        match result {
            Ok(Ok(resp)) => {
                replica.ok.inc();
                replica.duration.observe(started.elapsed().as_secs_f64());
                Ok(resp)
            }
            Ok(Err(e)) => Err(self.classify(replica, e)),
            Err(_) => {
                replica.timeouts.inc();
                Err(UpstreamError::Timeout {
                    replica: replica.url.clone(),
                    timeout: self.spec.timeout,
                })
            }
        }
    }

    fn classify(&self, replica: &Replica, e: hyper_util::client::legacy::Error) -> UpstreamError {
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
        while let Some(s) = source {
            if let Some(BodyError::TooLarge { limit }) = s.downcast_ref::<BodyError>() {
                return UpstreamError::BodyTooLarge { limit: *limit };
            }
            source = s.source();
        }
        let reason = error_chain(&e);
        if e.is_connect() {
            replica.connect_errors.inc();
            UpstreamError::Connect {
                replica: replica.url.clone(),
                reason,
            }
        } else {
            replica.errors.inc();
            UpstreamError::Failed {
                replica: replica.url.clone(),
                reason,
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
