//! Palisade: a caching reverse proxy for HTTP APIs that cannot be changed.
//!
//! A request passes each module once, top to bottom:
//!
//! ```text
//! server (accept, limits, timeouts) → proxy::handle: check request → router → identity → rate
//! limit → cache lookup (hit, stale: answer) → upstream (pick a replica, send) → cache store
//! (tee the body) → body (stream the response back, write the access log at its end)
//! ```
//!
//! - [`config`]: the TOML file, validation with file:line:col errors, loading.
//! - [`state`]: the config compiled into a snapshot behind an `ArcSwap`.
//! - [`reload`]: reload on SIGHUP, `POST /admin/reload` and a change of the file.
//! - [`server`]: public listeners (plain and TLS), connection limits and timeouts, graceful drain.
//! - [`tls`]: rustls configs: listener certificates by SNI, ALPN, upstream TLS.
//! - [`router`]: host → longest path prefix → method.
//! - [`proxy`]: the request pipeline, header rules, error responses.
//! - [`upstream`]: replicas, connection pools, balancers, health checks, circuit breakers,
//!   retries.
//! - [`body`]: streamed request and response bodies; [`framing`]: HTTP/1.1 message framing.
//! - [`cache`]: the response cache (policy, keys, memory and Redis tiers, coalescing, purge).
//! - [`metrics`]: every Prometheus metric; [`admin`]: the admin listener.
//! - [`cli`]: `run`, `check`, `explain`, `demo`; [`demo`]: the built-in demo replicas;
//!   [`explain`]: what the proxy would do with one request, without sending it.

pub mod admin;
pub mod body;
pub mod cache;
pub mod cli;
pub mod config;
pub mod demo;
pub mod explain;
pub mod framing;
pub mod metrics;
pub mod proxy;
pub mod ratelimit;
pub mod redis;
pub mod reload;
pub mod router;
pub mod server;
pub mod state;
pub mod tls;
pub mod upstream;
pub mod workers;
