//! Upstreams: each a set of replicas, each with its pool of keep-alive connections, with a balancer that picks
//! the replica for each request and the timeouts that turn a slow replica into a clear error.

mod balancer;
mod pool;

pub use pool::PooledConn;

use crate::body::{BodyError, RequestBody};
use crate::config::{Balance, UpstreamSpec};
use crate::metrics::Metrics;
use hyper::body::Incoming;
use pool::{Pool, PoolError};
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
    pool: Arc<Pool>,
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
}

impl Upstream {
    /// Builds an upstream with an empty connection pool.
    pub fn new(spec: &UpstreamSpec, metrics: &Metrics) -> Upstream {
        let replicas = spec
            .replicas
            .iter()
            .map(|url| {
                let authority = url.strip_prefix("http://").unwrap_or(url);
                let outcome = |o: &str| {
                    metrics
                        .upstream_requests
                        .with_label_values(&[&spec.name, url, o])
                };
                Arc::new(Replica {
                    url: url.as_str().into(),
                    pool: Pool::new(authority, spec.connect_timeout),
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
        Upstream {
            spec: spec.clone(),
            replicas,
            next: AtomicUsize::new(0),
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
    ) -> Result<(http::Response<Incoming>, PooledConn), UpstreamError> {
        if req.uri().scheme().is_some() || req.uri().path_and_query().is_none() {
            let path = req
                .uri()
                .path_and_query()
                .cloned()
                .unwrap_or(http::uri::PathAndQuery::from_static("/"));
            *req.uri_mut() = http::Uri::from(path);
        }
        let started = Instant::now();
        let result = tokio::time::timeout(self.spec.timeout, replica.pool.send(req)).await;
        match result {
            Ok(Ok(answer)) => {
                replica.ok.inc();
                replica.duration.observe(started.elapsed().as_secs_f64());
                Ok(answer)
            }
            Ok(Err(e)) => Err(Self::classify(replica, e)),
            Err(_) => {
                replica.timeouts.inc();
                Err(UpstreamError::Timeout {
                    replica: replica.url.clone(),
                    timeout: self.spec.timeout,
                })
            }
        }
    }

    fn classify(replica: &Replica, e: PoolError) -> UpstreamError {
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
        while let Some(s) = source {
            if let Some(BodyError::TooLarge { limit }) = s.downcast_ref::<BodyError>() {
                return UpstreamError::BodyTooLarge { limit: *limit };
            }
            source = s.source();
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
